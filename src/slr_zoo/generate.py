"""``python -m slr_zoo.generate RUN_DIR --prompt TEXT [--steps N] [--halting NAME key=value ...]``

Answers questions with a trained cell: cached, batched generation (greedy, or sampled with
``--temperature`` / ``--top-k`` / ``--top-p``), on ``--device`` (default: CUDA when present) and
under the run's precision. ``--halting`` picks the policy that decides each token's depth at
inference, e.g. ``--halting kl threshold=1e-3`` for Huginn's per-token exit on a model trained at
a fixed depth. Prints each answer with the loop iterations of every generated token.

From Python, the module itself is the function:

    import slr_zoo
    result = slr_zoo.generate(model, tokenizer, ["3 7 1 0 9 2 8 5 4 6 ? 4 3"], max_new_tokens=8)
    result.texts, result.ids, result.steps
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from slr_zoo.arguments import positive_int


@dataclass
class GenerationResult:
    texts: list[str]           # each answer, decoded without its EOS and special tokens
    ids: list[list[int]]       # each answer's token ids, its EOS included when it stopped there
    steps: list[list[int]]     # loop iterations that computed each of those tokens
    sequences: list[list[int]]  # prompt ids followed by the answer ids

    @property
    def mean_steps(self) -> float:
        """Mean loop iterations per generated token."""
        counts = [s for row in self.steps for s in row]
        return sum(counts) / len(counts) if counts else 0.0


def precision_context(precision: str | None, device: torch.device):
    """Autocast for a Lightning ``*-mixed`` precision; nothing otherwise (``*-true`` runs keep
    their weights in that dtype)."""
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 32, steps: int | None = None, halting=None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, cache_strategy: str = "latest",
             use_cache: bool = True, as_question: bool = True, batch_size: int = 64,
             precision: str | None = None, eos_token_id: int | list[int] | None = None,
             encoding=None) -> GenerationResult:
    """Generate an answer to each prompt (a string or a list of strings) with a LoopedLM.

    ``as_question``: a prompt is a question, encoded as the tasks encode it (its tokens, then the
    separator the model answers after); otherwise its tokens alone. ``eos_token_id`` defaults to
    the tokenizer's. ``encoding`` (``tasks.encoding.Encoding``, a cell's is
    ``parts.module.answer_scorer.encoding``): a question is prompted as the model was trained,
    with its markers and continuous thoughts. Runs on the model's device, in eval mode (restored afterwards), batch by
    batch; see ``inference.generate_ids`` for the other arguments."""
    from slr_zoo.inference import generate_ids
    from slr_zoo.inference.answers import left_padded
    from slr_zoo.tasks.encoding import prompt_ids
    from slr_zoo.tasks.tokenizer import special_ids, text_ids

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    eos = special_ids(tokenizer)[1]
    thoughts, after = 0, []
    if as_question and encoding is not None:
        encoded = [encoding.prompt({"question": p, "answer": "", "steps": []}, tokenizer) for p in prompts]
        thoughts, after = encoding.thoughts(), encoding.after_thoughts(tokenizer)
        questions = [len(prompt_ids(tokenizer, p)) for p in prompts]
    else:
        encoded = [prompt_ids(tokenizer, p) if as_question else text_ids(tokenizer, p) for p in prompts]
        questions = [len(ids) for ids in encoded]
    if any(not ids for ids in encoded):
        raise ValueError("every prompt needs at least one token")
    eos_token_id = eos if eos_token_id is None else eos_token_id
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    texts, ids, used = [], [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            input_ids, mask = left_padded(chunk, pad, device)
            query = torch.zeros_like(mask, dtype=torch.bool)
            for row, (prompt, n) in enumerate(zip(chunk, questions[start:start + batch_size])):
                query[row, input_ids.size(1) - len(prompt): input_ids.size(1) - len(prompt) + n] = True
            with precision_context(precision, device):
                out = generate_ids(model, input_ids, mask, max_new_tokens=max_new_tokens,
                                   steps=steps, halting=halting, eos_token_id=eos_token_id, pad_token_id=pad,
                                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator, cache_strategy=cache_strategy, use_cache=use_cache,
                                   thoughts=thoughts, after_thoughts=after, query_mask=query)
            chunk_ids, chunk_steps = out.per_sample()
            ids += chunk_ids
            used += chunk_steps
            texts += [tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True)
                      for row in chunk_ids]
    finally:
        model.train(was_training)
    return GenerationResult(texts, ids, used, [p + a for p, a in zip(encoded, ids)])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def torch_device(text: str) -> torch.device:
    """argparse type of ``--device``: a device this machine can put a tensor on, refused by name
    before the model loads (torch itself would fail at the first ``.to``, far from the option)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available ({why}); use cpu")
    if device.type == "meta":
        raise argparse.ArgumentTypeError("'meta' tensors hold no values to generate from; use cpu or cuda")
    try:
        torch.empty(0, device=device)
    except Exception as err:  # noqa: BLE001  (each backend fails in its own way: any failure means unusable)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine ({first})") from None
    return device


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.generate", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a trained cell directory: runs/<name>/<cell>")
    parser.add_argument("--prompt", action="append", required=True, help="a question (repeat for a batch)")
    parser.add_argument("--steps", type=positive_int, default=None, help="loop depth (default: the trained max_steps)")
    parser.add_argument("--halting", nargs="+", default=None, metavar=("NAME", "KEY=VALUE"),
                        help="halting policy at inference and its arguments, e.g. kl threshold=1e-3")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="with --sample (default 1.0)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="with --sample")
    parser.add_argument("--top-p", type=float, default=None, help="with --sample")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (with --sample)")
    parser.add_argument("--cache-strategy", default="latest", help="what later tokens read where a token exited "
                        "early: latest (Huginn's default) or frozen (exactly the uncached loop)")
    parser.add_argument("--no-cache", action="store_true", help="re-run the loop on the whole sequence per token")
    parser.add_argument("--device", type=torch_device, default=None, help="default: cuda when present, else cpu")
    args = parser.parse_args(argv)
    given = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                      ("--top-p", args.top_p), ("--seed", args.seed)) if value is not None]
    if given and not args.sample:
        parser.error(f"{', '.join(given)} shape sampling, and decoding is greedy without --sample; add --sample")
    if args.temperature is not None and not args.temperature > 0 or args.temperature == float("inf"):
        parser.error(f"--temperature must be a finite number > 0, got {args.temperature} (greedy decoding is the "
                     "default without --sample)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    args.temperature = 1.0 if args.temperature is None else args.temperature
    return args


def check_thoughts_inference(model, steps: int | None = None, halting: str | None = None) -> None:
    """A ``loop.mode: thoughts`` cell (Coconut) was trained to make every thought in a pass of its
    max_steps T with fixed halting, as fit requires: pass i runs at the stabiliser indices
    i·T + 1 .. i·T + T. At another depth T', inference puts pass i at i·T' + 1 .. i·T' + T', the
    step embeddings and loop LoRAs of another thought (or past the trained ones), and a halting
    policy would end passes that training never ended; both are refused by name."""
    if model.mode != "thoughts":
        return
    if halting is not None and halting != "fixed":
        raise ValueError(f"--halting {halting}: a loop.mode: thoughts cell runs every thought at its trained depth "
                         "(fit allows fixed halting only there); use --halting fixed or leave it out")
    if steps is not None and steps != model.max_steps:
        raise ValueError(f"--steps {steps}: a loop.mode: thoughts cell makes every thought in its trained "
                         f"{model.max_steps} iterations; at another depth a thought would read the step embeddings "
                         f"and loop LoRAs of another; use --steps {model.max_steps}")


def halting_from_args(words: list[str], model):
    """A policy named on the command line. One with learned parameters must be the run's own
    (its trained parameters are kept, the given keys change its settings)."""
    from slr_zoo.halting import HALTING
    from slr_zoo.recipe.load import parse_override

    name, settings = words[0], dict(parse_override(item) for item in words[1:])
    policy = HALTING.build({"name": name, **settings}, "--halting", hidden_size=model.backbone.hidden_size,
                           max_steps=model.max_steps)
    learned = dict(policy.named_parameters())
    if learned:
        if type(policy) is not type(model.halting):
            raise ValueError(f"--halting {name} has learned parameters ({', '.join(learned)}) that this run did not "
                             f"train (it was trained with {type(model.halting).__name__}); choose one without "
                             "(kl, threshold, fixed) or the run's own")
        policy.load_state_dict(model.halting.state_dict())
    return policy


def main(argv=None) -> int:
    from slr_zoo.recipe import load_cell
    from slr_zoo.registry import ComponentError
    from slr_zoo.training.checkpoint import CheckpointError
    from slr_zoo.tasks.tokenizer import unknown_words

    args = parse_args(argv)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        empty = [i for i, prompt in enumerate(args.prompt, start=1) if not prompt.strip()]
        if empty:
            raise ValueError(f"--prompt {empty[0]} is empty; give the question to answer")
        parts = load_cell(args.run_dir)
        for i, prompt in enumerate(args.prompt, start=1):
            unknown = unknown_words(parts.tokenizer, prompt)
            if unknown:
                print(f"generate: warning: --prompt {i} has {len(unknown)} word(s) the model's vocabulary lacks, "
                      f"read as {parts.tokenizer.unk_token}: {', '.join(unknown[:8])}", file=sys.stderr)
        model = parts.module.model.to(device)
        precision = parts.trainer.precision
        if precision in ("bf16-true", "16-true"):
            model = model.to(torch.bfloat16 if precision.startswith("bf16") else torch.float16)
        check_thoughts_inference(model, args.steps, args.halting[0] if args.halting else None)
        policy = halting_from_args(args.halting, model) if args.halting else None
        result = generate(model, parts.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, steps=args.steps,
                          halting=policy, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, cache_strategy=args.cache_strategy,
                          use_cache=not args.no_cache, precision=precision,
                          encoding=parts.module.answer_scorer.encoding)
    except (FileNotFoundError, ValueError, CheckpointError, ComponentError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    for prompt, text, steps in zip(args.prompt, result.texts, result.steps):
        print(f"{prompt}\n  -> {text}")
        print(f"     iterations per token: {' '.join(map(str, steps))}")
    print(f"mean iterations per generated token: {result.mean_steps:.2f}")
    return 0


class _CallableModule(types.ModuleType):
    """``slr_zoo.generate`` is this module (``python -m slr_zoo.generate``) and also the function."""

    def __call__(self, *args, **kwargs) -> GenerationResult:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
