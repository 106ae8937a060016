"""Workloads with known token lengths, built with the simulator's deterministic tokenizer:
multi-turn chat over shared system prompts, in a fixed order with seeded Poisson arrivals."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from kvroute.sim.tokenizer import SimTokenizer

__all__ = ["ChatTurn", "ChatWorkload", "ChatWorkloadSpec", "poisson_arrivals"]


@dataclass(frozen=True)
class ChatWorkloadSpec:
    """`groups` × `users_per_group` conversations; a group shares one system prompt, each user
    asks `turns` questions of about `user_tokens` tokens, each answered in `answer_tokens`."""

    groups: int = 16
    users_per_group: int = 6
    turns: int = 4
    system_tokens: int = 2048
    user_tokens: int = 150
    user_tokens_jitter: int = 20  # each question is user_tokens ± this many tokens
    answer_tokens: int = 100
    seed: int = 0

    @property
    def users(self) -> int:
        return self.groups * self.users_per_group

    @property
    def requests(self) -> int:
        return self.users * self.turns


@dataclass(frozen=True)
class ChatTurn:
    """One request of the workload: user `user` (global index) of `group` asks turn `turn`."""

    index: int  # position in the workload's fixed order
    group: int
    user: int
    turn: int
    question: str
    question_tokens: int


@dataclass
class ChatWorkload:
    """The fixed request sequence of a ChatWorkloadSpec; conversation state lives with the driver.

    Order is turn-major (every user's first question, then every second question, ...), users
    shuffled with the seed inside each turn, so one user's turns are far apart in time.
    """

    spec: ChatWorkloadSpec = field(default_factory=ChatWorkloadSpec)
    tokenizer: SimTokenizer = field(default_factory=SimTokenizer)

    def __post_init__(self) -> None:
        s = self.spec
        rng = random.Random(s.seed)
        self.system_prompts = [
            self.tokenizer.make_text(s.system_tokens, seed=f"system-{s.seed}-{g}")
            for g in range(s.groups)
        ]
        turns: list[ChatTurn] = []
        for t in range(s.turns):
            users = list(range(s.users))
            rng.shuffle(users)
            for u in users:
                n = s.user_tokens + rng.randint(-s.user_tokens_jitter, s.user_tokens_jitter)
                text = self.tokenizer.make_text(n, seed=f"user-{s.seed}-{u}-{t}")
                turns.append(ChatTurn(len(turns), u // s.users_per_group, u, t, text, n))
        self.turns = turns
        self._by_user: dict[int, list[ChatTurn]] = {}
        for turn in sorted(turns, key=lambda c: (c.user, c.turn)):
            self._by_user.setdefault(turn.user, []).append(turn)

    def system_message(self, group: int) -> dict[str, Any]:
        return {"role": "system", "content": self.system_prompts[group]}

    def messages(
        self, turn: ChatTurn, history: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The chat request of `turn`: system prompt, the user's earlier turns, the question."""
        return [
            self.system_message(turn.group),
            *(history or ()),
            {"role": "user", "content": turn.question},
        ]

    def synthetic_history(self, turn: ChatTurn) -> list[dict[str, Any]]:
        """The user's earlier turns with made-up answers of `answer_tokens` tokens, for
        drivers that send every turn at once (capacity runs) instead of waiting for answers."""
        history: list[dict[str, Any]] = []
        for earlier in self._by_user[turn.user][: turn.turn]:
            answer = self.tokenizer.make_text(
                self.spec.answer_tokens, seed=f"answer-{self.spec.seed}-{turn.user}-{earlier.turn}"
            )
            history.append({"role": "user", "content": earlier.question})
            history.append({"role": "assistant", "content": answer})
        return history

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Exact prompt length as the simulated engines count it (chat template applied)."""
        return len(self.tokenizer.encode_chat(messages))

    def describe(self) -> dict[str, Any]:
        first = self.turns[0]
        return {
            **asdict(self.spec),
            "requests": self.spec.requests,
            "first_turn_prompt_tokens": self.prompt_tokens(self.messages(first)),
        }


def poisson_arrivals(n: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """`n` arrival offsets (seconds from 0) of a Poisson process of `rate_per_s`."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s: expected > 0, got {rate_per_s}")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out
