"""The bench's tokenizer.json and chat template give the simulator's ids (a gateway tokenizing
locally in front of simulated engines sees the same prompts they do)."""

from __future__ import annotations

from pathlib import Path

from kvroute.bench.sim_tokenizer_files import write_sim_tokenizer
from kvroute.sim.tokenizer import SimTokenizer
from kvroute.tokenize import LocalTokenizer


def test_local_ids_equal_the_simulators_for_prompts_and_chats(tmp_path: Path) -> None:
    sim = SimTokenizer()
    tokenizer_json, template = write_sim_tokenizer(sim, tmp_path)
    local = LocalTokenizer(tokenizer_json, template.read_text())  # bos from tokenizer_config
    text = sim.make_text(300, "prompt") + f" , ({sim.words[3]}) ."
    assert local.encode_prompt(text) == sim.encode(text)
    messages = [
        {"role": "system", "content": sim.make_text(40, "system")},
        {"role": "user", "content": sim.make_text(60, "user")},
        {"role": "assistant", "content": sim.make_text(5, "answer")},
    ]
    for generation_prompt in (True, False):
        assert local.encode_chat(
            messages, add_generation_prompt=generation_prompt
        ) == sim.encode_chat(messages, add_generation_prompt=generation_prompt)
