"""Synthetic preferences with known ground truth.

Responses are built from controllable attributes — length, formality, lists, hedging, humour, refusal — and
each response's attribute ratings are recorded. A simulated user prefers responses by a known weighting of
those attributes (Bradley-Terry with a `sharpness`), so tests can check that decomposition finds the planted
directions and that personalization recovers each user's taste.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewardprism.data import PreferencePair

ATTRIBUTES = ("length", "formality", "lists", "hedging", "humour", "refusal")

TOPICS = (
    "baking sourdough bread", "installing solar panels", "learning Spanish", "training for a marathon",
    "keeping houseplants alive", "saving for retirement", "writing a cover letter", "brewing coffee at home",
    "starting a vegetable garden", "learning to play guitar", "planning a road trip", "fixing a leaky faucet",
    "adopting a rescue dog", "getting better sleep", "organizing a small kitchen", "preparing for a job interview",
    "learning to code in Python", "painting with watercolors", "reducing food waste", "buying a used car",
    "meditating every day", "hosting a dinner party", "studying for an exam", "cycling to work",
    "making homemade pasta", "photographing the night sky", "negotiating a salary", "composting at home",
    "learning to swim as an adult", "setting up a home network", "writing a short story", "caring for a newborn",
)
ASPECTS = ("preparation", "the right tools", "steady practice", "a realistic budget", "good timing",
           "safety", "honest feedback", "patience", "a simple routine", "small first steps")
FACTS = (
    "Start with {aspect} before anything else when it comes to {topic}.",
    "Most people find that {aspect} matters more than talent for {topic}.",
    "Keep notes on {aspect}, because {topic} rewards consistency.",
    "A common mistake in {topic} is to overlook {aspect}.",
    "Experts in {topic} usually recommend {aspect} from the first week.",
    "If progress stalls, revisit {aspect}; it is the usual bottleneck in {topic}.",
)
PROMPTS = ("How do I get started with {topic}?", "What should a beginner know about {topic}?",
           "Any tips for {topic}?", "Can you help me with {topic}?")
FORMAL_OPEN = ("Certainly. ", "Thank you for your question. ", "I would be glad to assist. ")
CASUAL_OPEN = ("Oh nice, ", "Ha, good one! So ", "Okay so basically, ")
FORMAL_LINK = ("Furthermore, ", "Additionally, ", "Moreover, ")
CASUAL_LINK = ("Also ", "Plus ", "And honestly ")
HEDGES = ("I think ", "It may be that ", "Perhaps ", "As far as I know, ")
JOKES = ("Fun fact: even the experts got it wrong the first dozen times, which is how they became experts.",
         "Just don't tell your cat; cats take credit for everything.",
         "Worst case, you will have a great story for your next party.")
REFUSALS = ("I'm sorry, but I can't help with that request.",
            "I'm not able to provide advice on this topic.")


@dataclass(frozen=True)
class SimulatedUser:
    """A known taste: utility = weights · attribute ratings."""

    name: str
    weights: tuple[float, ...]  # one per ATTRIBUTES entry

    def utility(self, ratings: np.ndarray) -> np.ndarray:
        return np.asarray(ratings) @ np.asarray(self.weights)


DEFAULT_USERS = (
    # The majority likes thorough, structured, polite answers and dislikes refusals.
    SimulatedUser("majority", (1.0, 0.6, 0.8, -0.3, 0.0, -2.0)),
    SimulatedUser("concise", (-1.5, 0.0, -0.5, -0.5, 0.5, -2.0)),
    SimulatedUser("playful", (0.2, -1.0, 0.0, 0.0, 1.5, -1.0)),
    SimulatedUser("cautious", (0.3, 0.8, 0.0, 1.2, -0.8, 0.8)),
)


class SyntheticGenerator:
    """Deterministic for a seed: the same call gives the same pairs."""

    def __init__(self, seed: int = 0, sharpness: float = 4.0, refusal_rate: float = 0.15):
        self.seed, self.sharpness, self.refusal_rate = seed, sharpness, refusal_rate

    def sample_ratings(self, rng: np.random.Generator) -> np.ndarray:
        """Ratings in [0, 1], one per attribute, as the response will realize them."""
        refusal = float(rng.random() < self.refusal_rate)
        length = 0.0 if refusal else float(rng.integers(0, 5)) / 4  # 1..5 sentences
        return np.array([length, float(rng.integers(0, 3)) / 2, float(rng.random() < 0.5) * (1 - refusal),
                         float(rng.integers(0, 3)) / 2, float(rng.random() < 0.4), refusal])

    def response(self, topic: str, ratings: np.ndarray, rng: np.random.Generator) -> str:
        length, formality, lists, hedging, humour, refusal = ratings
        opener = (FORMAL_OPEN if formality == 1 else CASUAL_OPEN if formality == 0 else ("",))[
            rng.integers(0, 3 if formality != 0.5 else 1)]
        if refusal:
            parts = [opener + REFUSALS[rng.integers(len(REFUSALS))]]
        else:
            n = 1 + int(round(length * 4))
            aspects = rng.choice(len(ASPECTS), size=n, replace=False)
            facts = rng.choice(len(FACTS), size=n, replace=True)
            sentences = [FACTS[f].format(aspect=ASPECTS[a], topic=topic) for a, f in zip(aspects, facts)]
            for i in rng.choice(n, size=min(n, int(hedging * 2)), replace=False):
                sentences[i] = HEDGES[rng.integers(len(HEDGES))] + sentences[i][0].lower() + sentences[i][1:]
            if lists:
                parts = [opener + f"Here are the main points about {topic}:"] + [f"- {s}" for s in sentences]
            else:
                links = FORMAL_LINK if formality == 1 else CASUAL_LINK if formality == 0 else ("",)
                body = [sentences[0]] + [links[rng.integers(len(links))] + s[0].lower() + s[1:] if links[0]
                                         else s for s in sentences[1:]]
                parts = [opener + " ".join(body)]
        if humour:
            parts.append(JOKES[rng.integers(len(JOKES))])
        return "\n".join(parts)

    def pairs(self, user: SimulatedUser, n: int, *, offset: int = 0) -> list[PreferencePair]:
        """`n` pairs labelled by `user`; `offset` picks a disjoint stream (e.g. for held-out pairs)."""
        rng = np.random.default_rng([self.seed, offset, _stable_id(user.name)])
        out = []
        for _ in range(n):
            topic = TOPICS[rng.integers(len(TOPICS))]
            prompt = PROMPTS[rng.integers(len(PROMPTS))].format(topic=topic)
            a, b = self.sample_ratings(rng), self.sample_ratings(rng)
            while np.array_equal(a, b):
                b = self.sample_ratings(rng)
            ta, tb = self.response(topic, a, rng), self.response(topic, b, rng)
            p_a = 1.0 / (1.0 + np.exp(-self.sharpness * (user.utility(a) - user.utility(b))))
            a_wins = rng.random() < p_a
            (chosen, rc), (rejected, rr) = ((ta, a), (tb, b)) if a_wins else ((tb, b), (ta, a))
            out.append(PreferencePair(prompt, chosen, rejected, group=user.name, annotator=user.name,
                                      attributes={"chosen": _named(rc), "rejected": _named(rr)}))
        return out

    def dataset(self, n_per_user: int, users: tuple[SimulatedUser, ...] = DEFAULT_USERS,
                offset: int = 0) -> list[PreferencePair]:
        return [p for u in users for p in self.pairs(u, n_per_user, offset=offset)]


def _named(ratings: np.ndarray) -> dict[str, float]:
    return {name: float(v) for name, v in zip(ATTRIBUTES, ratings)}


def _stable_id(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")


def is_synthetic(pairs: list[PreferencePair]) -> bool:
    """Pairs this generator made: each from one of its users and rated on all of its attributes."""
    users = {u.name for u in DEFAULT_USERS}
    return bool(pairs) and all(
        p.group in users and isinstance(p.attributes, dict)
        and all(isinstance(p.attributes.get(side), dict) and set(ATTRIBUTES) <= set(p.attributes[side])
                for side in ("chosen", "rejected"))
        for p in pairs)


def rating_matrix(pairs: list[PreferencePair], side: str) -> np.ndarray:
    """(N, len(ATTRIBUTES)) ratings of the chosen or rejected responses."""
    return np.array([[p.attributes[side][a] for a in ATTRIBUTES] for p in pairs])
