"""Render model_cards/: the cards of the ten registered tf_efficientnet_*_ns variants.

    python scripts/render_model_cards.py           # rewrite model_cards/*.md
    python scripts/render_model_cards.py --check   # exit 1 if a card is stale or missing

The cards come from timm_noisystudent.cards.variant_card: the paper's numbers and the official
recipes in models.NS_RECIPES, and timm's pretrained configs. Rerun after changing any of them.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='only check that model_cards/ is up to date')
    parser.add_argument('--out', type=Path, default=ROOT / 'model_cards')
    args = parser.parse_args()

    from timm_noisystudent.cards import variant_cards

    cards = variant_cards()
    stale = sorted(name for name, text in cards.items()
                   if not (args.out / name).is_file() or (args.out / name).read_text(encoding='utf-8') != text)
    extra = sorted(p.name for p in args.out.glob('*.md') if p.name not in cards) if args.out.is_dir() else []
    if args.check:
        for name in stale + extra:
            print(f'stale: {args.out / name}', file=sys.stderr)
        if stale or extra:
            print('run `python scripts/render_model_cards.py` to update model_cards/', file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        fd, tmp = tempfile.mkstemp(dir=args.out, prefix=f'.{name}.', suffix='.tmp')
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(cards[name])
        os.replace(tmp, args.out / name)
    for name in extra:
        (args.out / name).unlink()
    print(f'model_cards/: {len(stale)} written, {len(extra)} removed, {len(cards) - len(stale)} up to date')
    return 0


if __name__ == '__main__':
    sys.exit(main())
