"""actfx on model code nobody here wrote: Hugging Face transformers, torchvision, timm.

Per model: the share of saved floating-point bytes left unpacked at 2 bits, the activation
memory ratio (saved-tensor-hook count, ``actfx.accounting.count_saved``), whether the forward is
identical, and with ``--bias`` the gradient error of one step and of the mean of K steps at
``--bias-bits`` against the exact gradient (unbiased: the mean's error ~ 1/sqrt(K) of one step's).
Needs the optional packages (``pip install transformers timm torchvision``); models whose
package is missing are skipped.

    python benchmarks/real_models.py hf:gpt2 hf:llama hf:bert tv:swin_t timm:vit_small_patch16_224
    python benchmarks/real_models.py --no-example-inputs tv:efficientnet_b0 --bias --bias-bits 8
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import actfx
from actfx.accounting import count_saved

FLOAT = ("torch.float32", "torch.float16", "torch.bfloat16")
_TINY = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4, vocab_size=1000)


def _hf(name: str):
    import transformers as T

    configs = {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000,
                                                       n_positions=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_TINY, num_key_value_heads=2)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_TINY, num_key_value_heads=2)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_TINY, num_key_value_heads=2)),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(**_TINY, hidden_dropout_prob=0, attention_probs_dropout_prob=0)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**_TINY, hidden_dropout_prob=0,
                                                          attention_probs_dropout_prob=0)),
        "t5": lambda: T.T5EncoderModel(T.T5Config(num_layers=2, d_model=128, d_ff=256, num_heads=4, d_kv=32,
                                                  vocab_size=1000, dropout_rate=0)),
    }
    model = configs[name]()
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        """The tensor a loss reads (logits or the last hidden state)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            out = self.inner(input_ids=input_ids)
            return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    return Logits(model), (torch.randint(0, 1000, (2, 64)),)


def _vision(hub: str, name: str, size: int):
    if hub == "tv":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        fixed = {"vit_b_16": 224, "swin_t": 224, "maxvit_t": 224}.get(name)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
        fixed = model.default_cfg["input_size"][-1] if model.default_cfg.get("fixed_input_size") else None
    return model, (torch.randn(2, 3, fixed or size, fixed or size),)


def build(spec: str, size: int):
    hub, _, name = spec.partition(":")
    if hub == "hf":
        return _hf(name)
    return _vision(hub, name, size)


def _no_dropout(model):
    """Dropout and stochastic depth off before conversion (fx bakes their p into the graph)."""
    for module in model.modules():
        kind = type(module).__name__.lower()
        for name in ("p", "drop_prob"):  # torch / torchvision, timm's DropPath
            if ("drop" in kind or "stochasticdepth" in kind) and isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        if isinstance(getattr(module, "drop_rate", None), float):  # timm heads call F.dropout with it
            module.drop_rate = 0.0
    return model


def coverage(model, converted, args):
    torch.manual_seed(0)
    with count_saved(model) as before:
        expected = model(*args)
    torch.manual_seed(0)
    with count_saved(converted) as after:
        got = converted(*args)
    baseline = sum(v for k, v in before.by_dtype.items() if k in FLOAT)
    left = sum(v for k, v in after.by_dtype.items() if k in FLOAT)
    return 1 - left / baseline, before.activation_bytes / max(1, after.activation_bytes), torch.equal(got, expected)


def _gradient(model, args, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(*args)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def bias(model, converted, args, k):
    exact = _gradient(model, args, 10_000)
    samples = torch.stack([_gradient(converted, args, seed) for seed in range(k)])
    one = ((samples[0] - exact).norm() / exact.norm()).item()
    mean = ((samples.mean(0) - exact).norm() / exact.norm()).item()
    return one, mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="hf:NAME (gpt2, llama, qwen2, mistral, bert, roberta, t5), "
                        "tv:NAME (torchvision), timm:NAME")
    parser.add_argument("--no-example-inputs", action="store_true", help="convert without example_inputs")
    parser.add_argument("--size", type=int, default=64, help="image size where the model allows any (default 64)")
    parser.add_argument("--bias", action="store_true", help="also the one-step and mean-of-K gradient errors")
    parser.add_argument("--bias-bits", type=int, default=2)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.models:
        try:
            torch.manual_seed(0)
            model, inputs = build(spec, args.size)
        except ImportError as err:
            print(f"{spec}: skipped ({err})")
            continue
        model = _no_dropout(model.train())
        example = None if args.no_example_inputs else inputs
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = actfx.convert(model, bits=2, example_inputs=example)
            converted(*inputs)  # the first training call (a model fx cannot trace is captured here)
        seconds = time.perf_counter() - started
        share, ratio, same = coverage(model, converted, inputs)
        line = (f"{spec:34s} packed {share:6.1%}  ratio {ratio:5.1f}x  forward identical {same}  "
                f"convert+first call {seconds:5.1f} s")
        if args.bias:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                biased = actfx.convert(model, bits=args.bias_bits, example_inputs=example)
            one, mean = bias(model, biased, inputs, args.k)
            line += (f"  {args.bias_bits}-bit e1 {one:.4f} e{args.k} {mean:.4f} ratio {mean / one:.3f} "
                     f"(unbiased {1 / math.sqrt(args.k):.3f})")
        print(line, flush=True)


if __name__ == "__main__":
    main()
