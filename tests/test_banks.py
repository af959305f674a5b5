"""The shipped text banks: distinct, non-blank, and the shapes bank speaks the built-in model's vocabulary."""
from textspan import builtin, world
from textspan.text import BANK_DIR, TextBank, builtin_banks


def _lines(name):
    return (BANK_DIR / name).read_text().splitlines()


def test_general_bank():
    lines = _lines("general.txt")
    assert len(lines) >= 3000 and len(set(lines)) == len(lines) and all(l.strip() == l and l for l in lines)
    assert max(len(l.split()) for l in lines) <= 8


def test_shapes_bank_and_templates_use_only_the_world_vocabulary():
    tok = builtin.WordTokenizer(world.vocabulary())
    lines = _lines("shapes.txt")
    assert len(set(lines)) == len(lines) >= 150
    tok(lines)  # raises on any unknown word or over-long phrase
    for t in _lines("shapes_templates.txt"):
        assert t.count("{}") == 1
        tok([t.format(s) for s in world.SHAPES])
    assert all(t.count("{}") == 1 for t in _lines("templates.txt"))


def test_bank_loading_dedupes_and_names(tmp_path, caplog):
    (tmp_path / "b.txt").write_text("a\n\nb\na\n  c  \n")
    bank = TextBank.load(tmp_path / "b.txt")
    assert bank.texts == ["a", "b", "c"] and "duplicate" in caplog.text
    assert {"general", "shapes"} <= set(builtin_banks())
    assert TextBank.load("shapes").texts == _lines("shapes.txt")
