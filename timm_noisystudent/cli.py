"""The ``noisystudent`` command: argument parsing and nothing else.

Every subcommand is a thin call into the library. A ``UserError`` becomes a one-line message
and exit code 2; ``--debug`` shows the traceback instead.
"""
import argparse
import json
import sys
from typing import List, Optional

from .config import UserError


def _print_main(text: str) -> None:
    # under `accelerate launch` every process runs the command; only one should talk
    from accelerate import PartialState
    if PartialState().is_main_process:
        print(text, flush=True)


def _cmd_models(args) -> None:
    from .models import NS_RECIPES, count_params

    def fmt(v):
        return '-' if v is None else f'{v:.1f}'

    rows = [('model', 'train px', 'test px', 'params (M)', 'top-1', 'top-1 NS', 'RandAugment', 'dropout', 'ratio')]
    for name, r in NS_RECIPES.items():
        rows.append((name, str(r.train_size), str(r.test_size), f'{count_params(name) / 1e6:.1f}',
                     fmt(r.top1_baseline), fmt(r.top1_ns), r.randaugment or 'none', f'{r.dropout:g}',
                     str(r.unlabeled_ratio)))
    if args.json:
        _print_main(json.dumps({name: r.to_dict() for name, r in NS_RECIPES.items()}, indent=2))
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    lines.append('top-1: ImageNet, arXiv 1911.04252; "-" where the paper reports none.')
    _print_main('\n'.join(lines))


def _cmd_predict(args) -> None:
    from .models import load_model, predict

    model = load_model(args.model, pretrained=not args.no_pretrained, checkpoint=args.checkpoint)
    results = predict(model, args.images, top_k=args.top_k)
    if args.json:
        _print_main(json.dumps(results, indent=2))
        return
    lines = []
    for res in results:
        lines.append(res['image'])
        for p in res['predictions']:
            lines.append(f"  {p['probability'] * 100:6.2f}%  {p['index']:>4}  {p['label']}")
    _print_main('\n'.join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='noisystudent', description='Noisy Student Training for timm models.')
    parser.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    p = sub.add_parser('models', help='list the tf_efficientnet_*_ns variants and their recipes')
    p.add_argument('--json', action='store_true', help='print the recipes as JSON')
    p.set_defaults(fn=_cmd_models)

    p = sub.add_parser('predict', help='top-k classes of images')
    p.add_argument('images', nargs='+', metavar='IMAGE')
    p.add_argument('--model', '-m', required=True, help='timm name, hf-hub:org/name or a local model directory')
    p.add_argument('--checkpoint', help='safetensors weights to load on top of the model')
    p.add_argument('--top-k', type=int, default=5)
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.add_argument('--no-pretrained', action='store_true', help='random weights for a timm name (for testing)')
    p.set_defaults(fn=_cmd_predict)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
