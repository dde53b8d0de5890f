"""Type checkers see what a session holds: ``Sessions`` is generic over ``initial``'s return type."""
import subprocess
import sys
import textwrap

# mypy comes with the test extra (pip install -e ".[test]"); without it these tests fail, not skip.

SAMPLE = textwrap.dedent('''
    import dataclasses
    from telesession import Sessions

    @dataclasses.dataclass
    class Profile:
        name: str = ""

    typed = Sessions(initial=Profile)
    reveal_type(typed.current)
    reveal_type(typed.current.name)
    reveal_type(Sessions().current)
    typed.current.nmae  # a typo the checker must catch
    with typed.open("1") as opened:
        reveal_type(opened)  # opened: Profile
    reveal_type(typed.get("1"))  # got: Optional[Profile]
    reveal_type(typed.get("1", Profile()))  # got with default: Profile
    for key, snapshot in typed.items():
        reveal_type(snapshot)  # snapshot: Profile
''')


def test_sessions_is_generic_for_type_checkers(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(SAMPLE)
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                           str(sample)], capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert 'Revealed type is "sample.Profile"' in out, out
    assert 'Revealed type is "builtins.str"' in out or 'Revealed type is "str"' in out, out
    assert 'Revealed type is "builtins.dict[builtins.str, Any]"' in out or 'Revealed type is "dict[str, Any]"' in out, out
    assert '"Profile" has no attribute "nmae"' in out, out
    lines = {line.split(": note: Revealed type is ")[0].rsplit(":", 1)[-1]: line for line in out.splitlines()
             if "Revealed type" in line}
    source = SAMPLE.splitlines()
    by_comment = {source[int(n) - 1].split("# ")[-1]: line for n, line in lines.items() if "# " in source[int(n) - 1]}
    assert by_comment["opened: Profile"].endswith('"sample.Profile"'), out
    assert by_comment["snapshot: Profile"].endswith('"sample.Profile"'), out
    assert by_comment["got with default: Profile"].endswith('"sample.Profile"'), out
    got = by_comment["got: Optional[Profile]"]
    assert got.endswith('"Union[sample.Profile, None]"') or got.endswith('"sample.Profile | None"'), out


def test_package_is_typed():
    import telesession

    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports",
                           "-p", "telesession"], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(telesession.__file__).parent.parent))
    assert done.returncode == 0, done.stdout


def test_version_matches_the_installed_distribution():
    import importlib.metadata

    import telesession

    assert telesession.__version__ == importlib.metadata.version("telesession")
