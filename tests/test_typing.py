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


def test_package_is_typed():
    import telesession

    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports",
                           "-p", "telesession"], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(telesession.__file__).parent.parent))
    assert done.returncode == 0, done.stdout
