"""Widgets of the chat app."""
from edgemoe.tui.widgets.chat_log import ChatLog, MessageView
from edgemoe.tui.widgets.stats_view import HeatMap, StatsPanel, StatsSummary

__all__ = ["ChatLog", "HeatMap", "MessageView", "StatsPanel", "StatsSummary"]
