"""Screens of the chat app."""
from edgemoe.tui.screens.chat import ChatScreen
from edgemoe.tui.screens.info import HelpScreen, InfoScreen
from edgemoe.tui.screens.settings import SettingsChange, SettingsScreen
from edgemoe.tui.screens.stats import StatsScreen

__all__ = ["ChatScreen", "HelpScreen", "InfoScreen", "SettingsChange", "SettingsScreen", "StatsScreen"]
