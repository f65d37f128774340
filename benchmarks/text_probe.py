"""How much of a held-out phrasing's meaning reaches the denoiser: linear probes on the frozen text encoder's output.

    python benchmarks/text_probe.py --output benchmarks/results/text_probe.md

A text-conditioned denoiser trained on the training phrasings (`image_data.captions.TEMPLATES` / `ATTRIBUTE_WORDS`)
can follow a held-out phrasing ("heavy strokes", "leaning forward") only as far as the encoder puts it where the
training phrasing of the same attribute lies. This measures that ceiling without training a denoiser: for each
attribute (thickness, slant) a multinomial logistic regression is fitted on the encoder's features of prompts in the
training phrasings (the evaluation's `prompt_for`, digit and size drawn at random) and scored on new prompts in the
training phrasings and in the held-out ones, overall and per held-out phrase. Features: the attention-masked mean of
the token states (what the pipelines pass as `pooled_projections`) and their max over tokens. A denoiser's held-out
attribute accuracy can exceed the probe's only by reading the tokens in a way no linear readout of these features
does; it is also bounded by how well it renders the attribute for the training phrasings.
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from commands.common import environment_line  # noqa: E402
from image_data.captions import HELD_OUT_WORDS, prompt_for  # noqa: E402
from pipelines.text_encoder import DEFAULT_MAX_LENGTH, encode_prompts, load_text_encoder  # noqa: E402

PROBED = {"thickness": ("thin", "regular", "bold"), "slant": ("left", "upright", "right")}
SIZES = ("small", "medium", "large")


def make_prompts(count: int, held_out: bool, seed: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """`count` prompts asking for a random digit, thickness and slant (and half of them a size), and the bin indices."""
    rng = random.Random(f"probe-{seed}-{held_out}")
    prompts, labels = [], {attribute: [] for attribute in PROBED}
    for _ in range(count):
        wanted = {attribute: rng.choice(bins) for attribute, bins in PROBED.items()}
        if rng.random() < 0.5:
            wanted["size"] = rng.choice(SIZES)
        prompts.append(prompt_for(rng.randrange(10), wanted, rng, held_out))
        for attribute, bins in PROBED.items():
            labels[attribute].append(bins.index(wanted[attribute]))
    return prompts, {attribute: torch.tensor(values) for attribute, values in labels.items()}


def features(tokenizer, encoder, prompts: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{"mean": masked mean of the token states (the pooled embedding), "max": masked max over tokens}."""
    means, maxes = [], []
    for start in range(0, len(prompts), batch_size):
        states, mask, pooled = encode_prompts(
            tokenizer, encoder, prompts[start : start + batch_size], DEFAULT_MAX_LENGTH
        )
        means.append(pooled.float())
        maxes.append(states.float().masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1))
    return {"mean": torch.cat(means), "max": torch.cat(maxes)}


def fit_probe(train: torch.Tensor, labels: torch.Tensor, weight_decay: float, iterations: int = 100):
    """A multinomial logistic regression on standardised features (L-BFGS, deterministic); returns predict(x)."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x = (train - mean) / std
    classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda features: (((features - mean) / std) @ weight + bias).argmax(dim=1)


def held_out_phrase(prompt: str, bin_word: str) -> str:
    """Which held-out phrase of `bin_word` the prompt uses (the longest that occurs: "heavy" is in "with heavy
    strokes")."""
    return max((phrase for phrase in HELD_OUT_WORDS[bin_word] if phrase in prompt), key=len)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_train_prompts", type=int, default=2000, help="prompts the probes are fitted on")
    parser.add_argument("--num_test_prompts", type=int, default=1000, help="new prompts per phrasing set")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="L2 penalty of the probes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, help="write the tables (markdown) here")
    args = parser.parse_args(argv)
    for name in ("num_train_prompts", "num_test_prompts"):
        if getattr(args, name) < 30:
            parser.error(f"--{name} must be at least 30 (a few prompts per bin), got {getattr(args, name)}.")
    if args.weight_decay < 0:
        parser.error(f"--weight_decay must be >= 0, got {args.weight_decay}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer, encoder = load_text_encoder()
    fit_prompts, fit_labels = make_prompts(args.num_train_prompts, held_out=False, seed=args.seed)
    sets = {
        "training phrasings (new prompts)": make_prompts(args.num_test_prompts, held_out=False, seed=args.seed + 1),
        "held-out phrasings": make_prompts(args.num_test_prompts, held_out=True, seed=args.seed + 1),
    }
    fit_features = features(tokenizer, encoder, fit_prompts)
    set_features = {name: features(tokenizer, encoder, prompts) for name, (prompts, _) in sets.items()}

    overall, per_phrase = [], []
    held_prompts, held_labels = sets["held-out phrasings"]
    for kind in fit_features:
        for attribute, bins in PROBED.items():
            predict = fit_probe(fit_features[kind], fit_labels[attribute], args.weight_decay)
            scores = {}
            for name, (_, labels) in sets.items():
                predicted = predict(set_features[name][kind])
                scores[name] = float((predicted == labels[attribute]).float().mean())
                if name == "held-out phrasings":
                    held_predicted = predicted
            overall.append((kind, attribute, scores))
            if kind != "mean":
                continue
            # Per held-out phrase, for the pooled embedding (what the denoisers are given): which bin it is read as.
            for index, bin_word in enumerate(bins):
                for phrase in HELD_OUT_WORDS[bin_word]:
                    rows = [
                        i
                        for i, prompt in enumerate(held_prompts)
                        if held_labels[attribute][i] == index and held_out_phrase(prompt, bin_word) == phrase
                    ]
                    if not rows:
                        continue
                    counts = torch.bincount(held_predicted[rows], minlength=len(bins)).tolist()
                    read_as = ", ".join(f"{word} {count}" for word, count in zip(bins, counts))
                    per_phrase.append((attribute, bin_word, phrase, len(rows), counts[index] / len(rows), read_as))
    seconds = time.perf_counter() - started

    names = list(sets)
    lines = [
        "# Linear probes on the frozen text encoder: can a held-out phrasing be read as its attribute?",
        "",
        f"Generated by `python benchmarks/text_probe.py --num_train_prompts {args.num_train_prompts} "
        f"--num_test_prompts {args.num_test_prompts} --weight_decay {args.weight_decay} --seed {args.seed}` on "
        f"{environment_line()}, {seconds:.0f} s. Probes fitted on {args.num_train_prompts} prompts in the training "
        f"phrasings, scored on {args.num_test_prompts} new prompts per set; chance is 0.33.",
        "",
        "| features | attribute | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
        *(
            f"| {kind} | {attribute} | " + " | ".join(f"{scores[name]:.3f}" for name in names) + " |"
            for kind, attribute, scores in overall
        ),
        "",
        "Per held-out phrase (pooled embedding): the share read as the bin it means, and how all its prompts were read.",
        "",
        "| attribute | bin | held-out phrase | prompts | read correctly | read as |",
        "|---|---|---|---:|---:|---|",
        *(
            f'| {attribute} | {bin_word} | "{phrase}" | {count} | {share:.2f} | {read_as} |'
            for attribute, bin_word, phrase, count, share, read_as in per_phrase
        ),
        "",
    ]
    text = "\n".join(lines)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
