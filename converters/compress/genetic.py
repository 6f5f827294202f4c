"""Layer-wise genetic search for which experts to drop (MoE-I² §3.2).

A genome is the set of n experts dropped from one layer; fitness is the Frobenius error of the
layer's MoE output on calibration inputs (lower is better). Elitist selection, crossover by
sampling the child from the union of two parents, mutation by swapping a dropped expert for a
kept one. Returns the K best distinct candidates for the KT-reception field.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations

import torch

from edgemoe.converters.compress.moe_view import MoELayer, moe_output


@dataclass(frozen=True)
class GAConfig:
    population: int = 100
    generations: int = 50
    elite: int = 10
    mutation: float = 0.2
    keep_best: int = 3   # K candidates per layer
    seed: int = 0
    crossover: float = 1.0  # chance a child mixes two parents; otherwise it copies the first

    def __post_init__(self):
        if self.population < 2 or self.generations < 1 or not 0 < self.elite < self.population:
            raise ValueError("genetic search needs population >= 2, generations >= 1 and 0 < elite < population")
        if not 0.0 <= self.mutation <= 1.0 or self.keep_best < 1:
            raise ValueError("mutation must be in [0, 1] and keep_best >= 1")
        if not 0.0 <= self.crossover <= 1.0:
            raise ValueError(f"crossover probability must be in [0, 1], got {self.crossover}")


class LayerFitness:
    """Frobenius error of the pruned layer output, memoised per genome."""

    def __init__(self, layer: MoELayer, x: torch.Tensor):
        self.layer, self.x = layer, x
        with torch.no_grad():
            self.full = moe_output(layer, x)
        self.cache: dict[tuple[int, ...], float] = {}

    def __call__(self, drop: tuple[int, ...]) -> float:
        if drop not in self.cache:
            with torch.no_grad():
                self.cache[drop] = (self.full - moe_output(self.layer, self.x, drop)).norm().item()
        return self.cache[drop]


def genetic_search(fitness: LayerFitness, n_drop: int, cfg: GAConfig) -> list[tuple[tuple[int, ...], float]]:
    """The K best drop sets of size n_drop, with their errors, best first."""
    E = fitness.layer.n_experts
    if n_drop == 0:
        return [((), 0.0)]
    if math.comb(E, n_drop) <= cfg.population:  # small space: the search is exhaustive
        ranked = sorted(((d, fitness(d)) for d in combinations(range(E), n_drop)), key=lambda t: t[1])
        return ranked[: cfg.keep_best]
    rng = random.Random(cfg.seed)
    pop: set[tuple[int, ...]] = set()
    while len(pop) < cfg.population:
        pop.add(tuple(sorted(rng.sample(range(E), n_drop))))
    population = list(pop)
    for _ in range(cfg.generations):
        population.sort(key=fitness)
        nxt = population[: cfg.elite]
        seen = set(nxt)
        tries = 0
        while len(nxt) < cfg.population:
            tries += 1
            if tries > 20 * cfg.population:  # low crossover/mutation breed only copies: add fresh genomes
                c = tuple(sorted(rng.sample(range(E), n_drop)))
                if c not in seen:
                    seen.add(c)
                    nxt.append(c)
                continue
            a, b = rng.sample(population[: cfg.population // 2], 2)
            if cfg.crossover < 1.0 and rng.random() >= cfg.crossover:
                child = set(a)
            else:
                child = set(rng.sample(sorted(set(a) | set(b)), n_drop))
            if rng.random() < cfg.mutation:
                child.remove(rng.choice(sorted(child)))
                child.add(rng.choice([e for e in range(E) if e not in child]))
            c = tuple(sorted(child))
            if c not in seen:
                seen.add(c)
                nxt.append(c)
        population = nxt
    best = sorted(set(population) | set(fitness.cache), key=fitness)
    return [(d, fitness(d)) for d in best[: cfg.keep_best]]


def exhaustive_search(fitness: LayerFitness, n_drop: int) -> tuple[int, ...]:
    """NAEE-style baseline: the best drop set of one layer over all C(E, n) combinations."""
    return min(combinations(range(fitness.layer.n_experts), n_drop), key=fitness, default=())
