"""The docs: generated files never stale, cross-references that resolve, a short README."""
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
FIXTURE = Path(__file__).with_name('results_example.json')
README_MAX_LINES = 250


def _script():
    spec = importlib.util.spec_from_file_location('render_docs', ROOT / 'scripts' / 'render_docs.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def render():
    return _script()


# --- generated files ---------------------------------------------------------------------------

def test_generated_docs_are_up_to_date(render):
    texts = render.rendered()  # in memory; nothing is written
    assert {p.name for p in texts} >= {'config.md', 'cli.md', 'results.md', 'README.md', 'performance.md'}
    stale = [str(p.relative_to(ROOT)) for p in render.stale(texts)]
    assert not stale, f'stale: {", ".join(stale)}; run python scripts/render_docs.py'


def test_stale_finds_a_file_that_differs(render, tmp_path):
    path = tmp_path / 'x.md'
    path.write_text('old\n')
    assert render.stale({path: 'old\n'}) == []
    assert render.stale({path: 'new\n', tmp_path / 'missing.md': 'x'}) == [path, tmp_path / 'missing.md']


def test_every_config_field_has_one_description(render):
    assert render.key_problems() == []


def test_a_missing_or_unknown_description_is_named(render):
    descriptions = render.load_descriptions()
    del descriptions['TrainConfig']['min_steps']
    descriptions['TrainConfig']['no_such_key'] = 'text'
    descriptions['NoSuchConfig'] = {'x': 'y'}
    problems = render.key_problems(descriptions)
    assert any(p.startswith('TrainConfig.min_steps: no description') for p in problems)
    assert any(p.startswith('TrainConfig.no_such_key: described') for p in problems)
    assert any(p.startswith('NoSuchConfig:') for p in problems)


def test_config_md_gives_the_dataclass_defaults(render):
    text = render.config_md()
    # null: the preset's (config.PRESET_EPOCHS, PRESET_MIN_STEPS), which the descriptions give
    assert '| `train.epochs` | int or null | `null` |' in text and '| `train.min_steps` | int or null | `null` |' in text
    assert '| `train.preset` | string | `auto` |' in text
    assert '| `labeled.path` | string | required |' in text


def test_cli_md_lists_every_subcommand_and_flag(render):
    text = render.cli_md()
    parser = render._parser()
    for name, sub in render._subparsers(parser).items():
        assert f'## noisystudent {name}' in text
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)


# --- results -----------------------------------------------------------------------------------

@pytest.fixture()
def results_dir(tmp_path):
    folder = tmp_path / 'results'
    folder.mkdir()
    shutil.copy(FIXTURE, folder / 'digits-lcnet_050.json')
    return folder


def test_results_render_from_the_json(render, results_dir):
    results = render.load_results(results_dir)
    block = render.readme_results_block(results)
    assert '| digits | `lcnet_050` | 0 | 90.50 -> 94.50 -> 95.00 | 0.526 | 89.25 (1,720 steps, lr 0.003) | +5.75 |' \
        in block
    page = render.results_md(results)
    assert '| iter1-labels | iter0-teacher | - | - | 1270 | 90.9% |' in page
    assert 'same-budget baseline, lr 0.0015' in page and '92.00 -> 92.25' in page
    assert 'AMD EPYC (example), 2 cores' in page and 'timm 1.0.31' in page
    demo = render.demo_block(results)
    assert 'each student beat its teacher: top-1 90.50 -> 94.50 -> 95.00' in demo
    assert 'iter2-student *' in demo
    assert not _hashes(demo), 'the demo block goes into the README, which names no commit'


def test_only_default_runs_reach_the_readme(render, results_dir):
    data = json.loads(FIXTURE.read_text())
    (results_dir / 'tuned.json').write_text(json.dumps({**data, 'overrides': ['labels.threshold=0.5']}))
    (results_dir / 'seed1.json').write_text(json.dumps({**data, 'overrides': ['seed=1']}))
    results = render.load_results(results_dir)
    block = render.readme_results_block(results)
    assert block.count('| digits |') == 2 and '| 1 |' in block
    assert '`labels.threshold=0.5`' in render.results_md(results)


def test_optional_keys_may_be_missing(render, tmp_path):
    folder = tmp_path / 'results'
    folder.mkdir()
    (folder / 'bare.json').write_text(json.dumps({
        'task': 'cifar10-4k', 'model': 'tinynet_e',
        'stages': [{'stage': 'iter0-teacher', 'top1': 50.0}, {'stage': 'iter1-student', 'top1': 55.0}]}))
    results = render.load_results(folder)
    assert '| cifar10-4k | `tinynet_e` | 0 | 50.00 -> 55.00 | - | - | - | - | - |' in \
        render.readme_results_block(results)
    assert 'no meta recorded' in render.results_md(results)


def test_no_results_say_so_in_one_line(render, tmp_path):
    block = render.readme_results_block(render.load_results(tmp_path))
    assert len(block.splitlines()) == 1 and 'scripts/results.py' in block
    assert render.demo_block([]) is None  # the README's demo block keeps its text


def test_a_bad_results_file_is_refused(render, tmp_path):
    (tmp_path / 'bad.json').write_text('{"task": "digits"}')
    with pytest.raises(SystemExit, match='bad.json'):
        render.load_results(tmp_path)


def test_bench_json_renders(render, tmp_path):
    (tmp_path / 'b0.json').write_text(json.dumps({
        'device': 'cpu: x86_64, 2 cores', 'torch': '2.14.1',
        'settings': {'model': 'tf_efficientnet_b0', 'image_size': None, 'batch_size': 32},
        'labeling': {'img_per_s': 32.1, 'ratio_to_baseline': 1.96, 'fraction_of_ceiling': 0.82},
        'training': {'img_per_s': 9.2, 'ratio_to_baseline': 1.66}}))
    block = render.bench_block(render.load_bench(tmp_path))
    assert '| 32.1 | 1.96x | 82% | 9.2 | 1.66x | - |' in block
    assert 'No bench results' in render.bench_block([])


# --- cross-references --------------------------------------------------------------------------

_FENCE = re.compile(r'^```.*?^```', re.S | re.M)
_SEE = re.compile(r'\bsee (?:the )?(?:(?P<file>README(?:\.md)?|(?:docs/)?[\w-]+\.md),? )?["“](?P<heading>[^"”\n]+)["”]')
_LINK = re.compile(r'\[[^\]\n]*\]\((?P<target>[^)\s]+)\)')


def _prose(text: str) -> str:
    return _FENCE.sub('', text)


def _headings(path: Path) -> list:
    return [m.group(2).strip() for m in re.finditer(r'^(#{1,6})\s+(.+?)\s*#*\s*$', _prose(path.read_text()), re.M)]


def _plain(heading: str) -> str:
    return heading.replace('`', '').strip().lower()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r'[^\w\- ]', '', heading.replace('`', '').strip().lower())
    return text.replace(' ', '-')


def _anchors(path: Path) -> set:
    seen, out = {}, set()
    for h in _headings(path):
        slug = _slug(h)
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f'{slug}-{n}')
        seen[slug] = n + 1
    return out


def _doc_files() -> list:
    return [ROOT / 'README.md', ROOT / 'CHANGELOG.md', ROOT / 'CONTRIBUTING.md'] + sorted(DOCS.glob('*.md'))


def _file_of(name: str, where: Path) -> Path:
    if name.startswith('README'):
        return ROOT / 'README.md'
    for base in (where.parent, ROOT, DOCS):
        if (base / name).is_file():
            return base / name
    return where.parent / name


def bad_references(text: str, where: Path, files: list) -> list:
    """`see "X"` naming no heading, and relative links to a missing file or anchor."""
    all_headings = {_plain(h) for f in files for h in _headings(f)}
    problems = []
    prose = _prose(text)
    for m in _SEE.finditer(prose):
        heading = _plain(m.group('heading'))
        if m.group('file'):
            target = _file_of(m.group('file'), where)
            if not target.is_file() or heading not in {_plain(h) for h in _headings(target)}:
                problems.append(f'{where.name}: see {m.group("file")}, "{m.group("heading")}": no such heading')
        elif heading not in all_headings:
            problems.append(f'{where.name}: see "{m.group("heading")}": no such heading')
    for m in _LINK.finditer(prose):
        target = m.group('target')
        if re.match(r'[a-z]+:', target):
            continue
        path, _, anchor = target.partition('#')
        file = (where.parent / path).resolve() if path else where
        if not file.exists():
            problems.append(f'{where.name}: link to {target}: no such file')
        elif anchor and file.suffix == '.md' and anchor not in _anchors(file):
            problems.append(f'{where.name}: link to {target}: no such heading')
    return problems


def _hashes(text: str) -> list:
    return [w for w in re.findall(r'(?<![\w./-])[0-9a-f]{7,40}(?![\w/-])', text)
            if re.search(r'[0-9]', w) and re.search(r'[a-f]', w)]


def test_cross_references_in_the_docs_resolve():
    files = _doc_files()
    problems = [p for f in files for p in bad_references(f.read_text(), f, files)]
    assert not problems, '\n'.join(problems)


def test_cross_references_in_the_cli_help_resolve(render):
    files = _doc_files()
    texts = render.help_texts()
    assert any('docs/config.md' in t for t in texts)
    problems = [p for t in texts for p in bad_references(t, ROOT / 'cli.py', files)]
    # a help string may name a docs page without a heading; it must exist
    problems += [f'cli: {name}: no such file' for t in texts for name in re.findall(r'docs/[\w-]+\.md', t)
                 if not (ROOT / name).is_file()]
    assert not problems, '\n'.join(problems)


def test_the_reference_check_catches_a_missing_heading(tmp_path):
    files = _doc_files()
    where = DOCS / 'x.md'
    assert bad_references('see "What epochs mean"', where, files) == []
    assert bad_references('see docs/how-it-works.md, "What epochs mean"', ROOT / 'cli.py', files) == []
    assert bad_references('[ok](how-it-works.md#what-epochs-mean)', where, files) == []
    assert bad_references('see "No Such Heading"', where, files)
    assert bad_references('see README, "What epochs mean"', where, files)  # it lives in docs/
    assert bad_references('[x](how-it-works.md#no-such-heading)', where, files)
    assert bad_references('[x](no-such-file.md)', where, files)
    assert bad_references('```\nsee "inside code"\n```', where, files) == []


# --- the README --------------------------------------------------------------------------------

def test_readme_is_short():
    lines = (ROOT / 'README.md').read_text().count('\n')
    assert lines <= README_MAX_LINES, f'README.md has {lines} lines; at most {README_MAX_LINES}, the rest in docs/'


def test_readme_names_no_commit():
    found = _hashes((ROOT / 'README.md').read_text())
    assert not found, f'README.md names commits {found}; history goes to docs/decisions.md'
    assert _hashes('fixed in 49d15f9 and eaf2bcd') == ['49d15f9', 'eaf2bcd']
    assert _hashes('tf_efficientnet_b0 at 1e-3, 1280 features, deadbeef') == []


def test_readme_keeps_its_sections_in_order():
    headings = [h for h in _headings(ROOT / 'README.md') if not h.startswith('timm-')]
    expected = ['Install', 'The demo', 'Your own images, or a Hub dataset', 'The result in plain timm',
                'Push to the Hub', 'Many GPUs', "Results with today's defaults", 'Speed',
                'The `tf_efficientnet_*_ns` entrypoints', 'Documentation']
    assert headings == expected
    text = (ROOT / 'README.md').read_text()
    assert 'make demo' in text and 'make test' in text and 'local-dir:' in text and 'hf-hub:' in text
