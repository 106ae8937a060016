"""A Hugging Face `tokenizer.json` and chat template giving the simulator's ids (sim/tokenizer.py)
for the words its text is made of, so a gateway can tokenize locally in front of a sim fleet."""

from __future__ import annotations

import json
import string
from pathlib import Path

from kvroute.sim.tokenizer import BOS_ID, EOS_ID, SimTokenizer

__all__ = ["CHAT_TEMPLATE", "ROLES", "write_sim_tokenizer"]

ROLES = ("system", "user", "assistant")
# sim/tokenizer.py render_chat: "<s>", then "<|role|> content" per message, then
# "<|assistant|>", joined by newlines (which only separate pieces).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}\n<|{{ m['role'] }}|> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}\n<|assistant|>{% endif %}"
)
_PIECE = r"<\|[A-Za-z_]+\|>|\w+|[^\w\s]"  # sim/tokenizer.py _PIECE


def write_sim_tokenizer(sim: SimTokenizer, directory: Path) -> tuple[Path, Path]:
    """Write `tokenizer.json` (a word-level vocabulary: each generation word, role marker and
    ASCII punctuation mark with the simulator's id for it, BOS added to prompts), its
    `tokenizer_config.json` (bos and eos tokens) and `chat_template.jinja` into `directory`;
    return the first and last. Other words encode as id 0 (the simulator hashes them)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": BOS_ID, "</s>": EOS_ID}
    for word in (*sim.words, *(f"<|{role}|>" for role in ROLES), *string.punctuation):
        vocab[word] = sim.piece_id(word)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PIECE), "isolated")]
    )
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS_ID)]
    )
    # Saving keeps one word per id (the model writes its id -> word table), but the simulator
    # hashes some words to one id: the full word -> id table goes into the file instead, which
    # loading takes as it is (only decoding, which nobody here does, would be ambiguous).
    config = json.loads(tok.to_str())
    config["model"]["vocab"] = vocab
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = directory / "tokenizer.json"
    tokenizer_json.write_text(json.dumps(config), encoding="utf-8")
    # The template's bos_token comes from here (LocalTokenizer reads it beside tokenizer.json);
    # without it a gateway's chats lacked the simulator's BOS, one token short.
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(special), encoding="utf-8")
    template = directory / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return tokenizer_json, template
