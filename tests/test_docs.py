"""The documentation (README.md and docs/*.md) shows what runs.

- Every fenced ```python block compiles, and every name it imports from bunpulse exists. A block
  that is only a fragment may say so with `<!-- fragment -->` on the line before it (it then
  needs only to parse once dedented); `<!-- skip: REASON -->` skips one, with its reason.
- Every ```sh block's commands, and every `command` in the text that starts with a known
  program, name real things: scripts, files and folders that exist, flags that the program's
  own --help shows (`python -m bunpulse`, `scripts/serve` and `bunpulse` are one program),
  gunicorn worker classes and WSGI applications that exist, Python passed with -c compiles.
  ```json blocks load, ```js blocks parse (with node, when it is installed).
- Every relative link and image points to a file that exists, and every #anchor to a heading.
- The options table is the options of bunpulse/config.py (flag, environment variable,
  default), every flag `python -m bunpulse --help` shows is in it, and every --flag the docs
  mention is shown by --help (or by the other command it belongs to); the apps file's table
  is the fields of bunpulse/apps.py's App.
- The README stays a landing page: at most 260 lines.
- Once bunpulse/serving/ exists, the code layout table of docs/architecture.md matches the
  folders both ways.
"""
import ast
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from bunpulse import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the virtual environment's scripts (.venv/bin)
README_MAX_LINES = 260
FENCE = re.compile(r"^([ \t]*)```([\w+-]*)[ \t]*$")
LANGUAGES = {"python", "sh", "js", "json", "dotenv"}
# The system's own commands a deployment recipe runs: their paths into the checkout are checked.
SYSTEM_COMMANDS = {"apt-get", "useradd", "cd", "mkdir", "cp", "systemctl", "curl"}
PATHLIKE = re.compile(r"^(scripts|deploy|tests|docs)/[\w./-]*$")
# --flags the docs name that belong to another command than `python -m bunpulse`: that
# command's --help must show them.
OTHER_COMMANDS = {"--pid": "gunicorn", "--target": "scripts/bench.py",
                  "--quick": "scripts/bench.py", "--minutes": "scripts/soak.py",
                  "--connections": "scripts/bench_idle.py", "--debug": "flask",
                  "--json": "bunpulse apps", "--set": "bunpulse apps",
                  "--unset": "bunpulse apps"}
APPS_COMMANDS = ("add", "list", "show", "update", "disable", "enable", "rotate-secret",
                 "promote-key", "retire-key", "delete")


def doc_files():
    docs = os.path.join(ROOT, "docs")
    return ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(docs)
                                  if name.endswith(".md"))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


@dataclasses.dataclass
class Block:
    path: str
    line: int
    language: str
    code: str
    marker: str  # the HTML comment on the line before the fence, if any

    def __str__(self):
        return f"{self.path}:{self.line} ({self.language})"


def blocks_and_prose(path):
    """The fenced blocks of a file, and its text with the blocks blanked out."""
    blocks, prose, lines = [], [], read(path).split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            prose.append(lines[i])
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(r"^[ \t]*```[ \t]*$", lines[i]):
            body.append(lines[i])
            i += 1
        before = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        marker = before if before.startswith("<!--") else ""
        blocks.append(Block(path, start + 1, opening[2], textwrap.dedent("\n".join(body)),
                            marker))
        prose.extend([""] * (i - start + 1))
        i += 1
    return blocks, "\n".join(prose)


def all_blocks(language=None):
    found = [block for path in doc_files() for block in blocks_and_prose(path)[0]]
    return [block for block in found if language is None or block.language == language]


def code_spans(prose):
    return [re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", prose)]


def help_output(command, cwd=ROOT):
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr


@functools.cache
def bunpulse_help():
    returncode, text = help_output([sys.executable, "-m", "bunpulse", "--help"])
    assert returncode == 0, text
    return text


@functools.cache
def program_help(program):
    """The --help text of a command the docs run; '' when it is not installed."""
    if program == "bunpulse":
        return bunpulse_help()
    if program == "bunpulse apps":  # the apps command and each of its commands
        return "".join(help_output([sys.executable, "-m", "bunpulse", "apps"] + command +
                                   ["--help"])[1] for command in [[]] + [[c] for c in APPS_COMMANDS])
    if program == "gunicorn":
        return help_output([os.path.join(BIN, "gunicorn"), "--help"])[1]
    if program == "flask":  # the group's options and `flask run`'s
        return (help_output([os.path.join(BIN, "flask"), "--help"])[1] +
                help_output([os.path.join(BIN, "flask"), "run", "--help"])[1])
    if program == "pytest":
        return help_output([sys.executable, "-m", "pytest", "--help"])[1]
    if program.endswith(".py"):
        returncode, text = help_output([sys.executable, program, "--help"])
        assert returncode == 0, f"{program} --help: {text}"
        return text
    return read(program)  # a shell script: the flags it reads are in its text


def shows_flag(help_text, flag):
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", help_text) is not None


def defined_names(path):
    tree = ast.parse(read(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def module_file(module, search):
    """The file of a module, looked up in the repository folders `search` (PYTHONPATH), then
    in the installed packages."""
    parts = module.split(".")
    for folder in search:
        base = os.path.join(ROOT, folder, *parts)
        for candidate in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(candidate):
                return os.path.relpath(candidate, ROOT)
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return None
    return spec.origin if spec is not None else None


def check_object(spec, search, problems):
    """`module:name`, `module:name()` or `package.module.Name`: the module exists and defines
    the name."""
    if ":" in spec:
        module, name = spec.split(":", 1)
        name = name.removesuffix("()")
    else:
        module, _, name = spec.rpartition(".")
    path = module_file(module, search)
    if path is None:
        problems.append(f"no module {module!r} (for {spec})")
    elif name and name not in defined_names(path):
        problems.append(f"{path} defines no {name!r} (for {spec})")


def check_flags(args, program, problems):
    text = program_help(program)
    for arg in args:
        if re.match(r"^--?[A-Za-z]", arg):
            flag = arg.split("=", 1)[0]
            if not shows_flag(text, flag):
                problems.append(f"{flag}: not an option of {program}")


def check_command(tokens, problems):
    """One command line, split by shlex: what it names exists."""
    env = {}
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    search = [p for p in env.get("PYTHONPATH", "").split(":") if p] + ["."]
    for token in tokens + list(env.values()) + search:
        if PATHLIKE.match(token) and not os.path.exists(os.path.join(ROOT, token)):
            problems.append(f"{token}: no such file")
    if not tokens:
        return
    program, args = tokens[0], tokens[1:]
    name = program
    if program.startswith(".venv/bin/"):
        name = program[len(".venv/bin/"):]
        if not any(os.path.exists(os.path.join(folder, name))
                   for folder in (os.path.join(ROOT, ".venv", "bin"), BIN)):
            problems.append(f"{program}: not installed by scripts/setup --dev")
    if name in ("python", "python3"):
        if args[:1] == ["-c"] and len(args) > 1:
            try:
                compile(args[1], "python -c", "exec")
            except SyntaxError as exc:
                problems.append(f"python -c: {exc}")
            return
        if args[:1] == ["-m"]:
            module, rest = args[1], args[2:]
            if module in ("bunpulse", "pytest", "gunicorn"):
                return check_command([module] + rest, problems)
            problems.append(f"python -m {module}: the docs test does not know it")
            return
        if args and args[0].endswith(".py"):
            if not os.path.isfile(os.path.join(ROOT, args[0])):
                problems.append(f"{args[0]}: no such script")
            else:
                check_flags(args[1:], args[0], problems)
            return
        return
    if name == "bunpulse" and args[:1] == ["apps"]:
        # the bare name, a command, an option before it, or a placeholder (COMMAND)
        if len(args) > 1 and not (args[1] in APPS_COMMANDS or args[1].startswith("-")
                                 or args[1].isupper()):
            problems.append(f"bunpulse apps {' '.join(args[1:2])}: no such command")
        check_flags(args, "bunpulse apps", problems)
    elif name == "bunpulse" or program == "scripts/serve":
        check_flags(args, "bunpulse", problems)
    elif name == "pytest" or program == "scripts/test":
        check_flags(args, "pytest", problems)
    elif program.startswith("scripts/"):
        if os.path.isdir(os.path.join(ROOT, program)):
            pass  # a folder named in the text, not run
        elif not os.path.isfile(os.path.join(ROOT, program)):
            problems.append(f"{program}: no such script")
        else:
            check_flags(args, program, problems)
    elif name == "gunicorn":
        check_flags(args, "gunicorn", problems)
        positional, skip = [], False
        for i, arg in enumerate(args):
            if skip:
                skip = False
            elif arg in ("-c", "--config"):
                if not os.path.isfile(os.path.join(ROOT, args[i + 1])):
                    problems.append(f"{args[i + 1]}: no such gunicorn configuration")
                skip = True
            elif arg in ("-k", "--worker-class"):
                check_object(args[i + 1], search, problems)
                skip = True
            elif arg.startswith("-"):
                skip = "=" not in arg and arg not in ("--reload", "--daemon")
            else:
                positional.append(arg)
        for app in positional:
            check_object(app, search, problems)
    elif name == "flask":
        check_flags(args, "flask", problems)
        if "--app" in args:
            target = args[args.index("--app") + 1]
            check_object(target if ":" in target else target + ":", search, problems)
    elif name == "pip":
        if args[:1] != ["install"]:
            problems.append(f"pip {' '.join(args)}: the docs test does not know it")
    elif name in SYSTEM_COMMANDS:
        pass  # what it names in the checkout was checked above
    else:
        problems.append(f"{program}: the docs test does not know this command")


def split_commands(text):
    """The command lines of a shell block (continuations joined, comments dropped), each as
    tokens, split at ;, &&, || and |."""
    text = re.sub(r"\\\n[ \t]*", " ", text)
    for line in text.split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


KNOWN_PROGRAMS = re.compile(r"^(scripts/\S+|\.venv/bin/\S+|python3?|bunpulse|gunicorn|flask|"
                            r"pip)$")


def is_command(span):
    tokens = span.split()
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):
        tokens.pop(0)
    return bool(tokens) and KNOWN_PROGRAMS.match(tokens[0]) is not None


# ---------------------------------------------------------------------- Python blocks


@pytest.mark.parametrize("block", all_blocks("python"), ids=str)
def test_every_python_block_compiles(block):
    if block.marker.startswith("<!-- skip"):
        reason = block.marker[len("<!-- skip"):].strip(" :->")
        assert reason, f"{block}: a skipped block says why: <!-- skip: REASON -->"
        pytest.skip(reason)
    if block.marker == "<!-- fragment -->":
        tree = ast.parse(block.code)
    else:
        tree = ast.parse(block.code)
        compile(block.code, str(block), "exec")
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bunpulse":
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{alias.name}" for alias in node.names
                        if not hasattr(module, alias.name)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "bunpulse":
            missing += [] if hasattr(importlib.import_module("bunpulse"), node.attr) else \
                [f"bunpulse.{node.attr}"]
    assert not missing, f"{block} uses names bunpulse does not have: {missing}"


def test_fences_name_a_language_this_test_checks():
    unknown = [str(block) for block in all_blocks() if block.language not in LANGUAGES]
    assert not unknown, f"blocks with a language this test does not check: {unknown}"


@pytest.mark.parametrize("block", all_blocks("json"), ids=str)
def test_every_json_block_loads(block):
    json.loads(block.code)


@pytest.mark.parametrize("block", all_blocks("dotenv"), ids=str)
def test_every_environment_file_is_a_valid_configuration(block):
    """An environment file the docs show: each line one of BunPulse's variables, and together
    a configuration load_settings accepts."""
    environ = {}
    for line in block.code.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            environ[name.strip()] = value.strip()
    known = {option.env for option in config.OPTIONS}
    assert set(environ) <= known, f"not BunPulse's variables: {set(environ) - known}"
    config.load_settings([], environ=dict(environ, BUNPULSE_ENV_FILE=os.devnull))


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("block", all_blocks("js"), ids=str)
def test_every_js_block_parses(block, tmp_path):
    source = tmp_path / "block.js"
    source.write_text(block.code)
    out = subprocess.run(["node", "--check", str(source)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, f"{block}: {out.stderr}"


# ---------------------------------------------------------------------- commands


@pytest.mark.parametrize("block", all_blocks("sh"), ids=str)
def test_every_shell_command_names_real_files_and_flags(block):
    problems = []
    for tokens in split_commands(block.code):
        check_command(tokens, problems)
    assert not problems, f"{block}: {problems}"


@pytest.mark.parametrize("path", doc_files())
def test_every_command_and_path_in_the_text_is_real(path):
    problems = []
    for span in code_spans(blocks_and_prose(path)[1]):
        if is_command(span):
            try:
                for tokens in split_commands(span):
                    spot = []
                    check_command(tokens, spot)
                    problems += [f"`{span}`: {problem}" for problem in spot]
            except ValueError as exc:  # shlex: an unbalanced quote
                problems.append(f"`{span}`: {exc}")
        else:
            problems += [f"`{span}`: {token}: no such file" for token in span.split()
                         if PATHLIKE.match(token) and
                         not os.path.exists(os.path.join(ROOT, token))]
    assert not problems, problems


def test_python_m_bunpulse_help_shows_every_flag_the_docs_mention():
    text = bunpulse_help()  # runs it: exits 0
    problems = []
    for path in doc_files():
        if path == "docs/benchmarks.md":
            continue  # its bare --flags are scripts/bench*.py's, checked with its commands
        for span in code_spans(blocks_and_prose(path)[1]):
            if not span.startswith("--"):
                continue
            program = OTHER_COMMANDS.get(span.split()[0].split("=")[0], "bunpulse")
            flags = [token.split("=")[0] for token in span.split() if token.startswith("--")]
            other = program_help(program)
            problems += [f"{path}: `{span}`: {flag} is not an option of {program}"
                         for flag in flags
                         if not shows_flag(text if program == "bunpulse" else other, flag)]
    assert not problems, problems


def test_the_options_table_is_the_options_of_the_code():
    from bunpulse.config import OPTIONS
    table = {}
    for flag, env, default in re.findall(r"^\| `(--[\w-]+)` \| `(\w+)` \|([^|]*)\|",
                                         read("docs/configuration.md"), re.M):
        table[flag] = (env, default.strip())
    assert set(table) == {option.flag for option in OPTIONS}
    for option in OPTIONS:
        env, default = table[option.flag]
        assert env == option.env, option.flag
        if option.default is not None:
            expected = str(option.default).lower()
            assert default.split(" ")[0] == expected, (option.flag, default, expected)
    shown = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", bunpulse_help())) - {"--help"}
    assert shown == set(table), "python -m bunpulse --help and the options table differ"


def test_the_apps_table_is_the_fields_of_an_app():
    from bunpulse.apps import App
    # its own subsection's tables (the apps command's table lists commands)
    text = read("docs/configuration.md").split("## Many apps", 1)[1].split("\n### ", 1)[0]
    fields = set()
    for cell in re.findall(r"^\| ([^|]+) \|", text, re.M):
        fields.update(re.findall(r"`(\w+)`", cell))
    assert fields == {field.name for field in dataclasses.fields(App)}


# ---------------------------------------------------------------------- links


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", blocks_and_prose(path)[1], re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path):
    prose = blocks_and_prose(path)[1]
    prose = re.sub(r"`[^`]+`", "x", prose)  # code is not a link
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


@pytest.mark.parametrize("path", doc_files())
def test_every_relative_link_points_to_a_file_and_a_heading(path):
    assert links(path) or path == "docs/benchmarks.md", f"{path} links to nothing"
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(os.path.join(ROOT, resolved)):
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved}")
    assert not broken, f"{path}: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(target.partition("#")[0]) for target in links("README.md")}
    assert set(doc_files()[1:]) <= linked


# ---------------------------------------------------------------------- the landing page


def test_the_readme_is_a_landing_page():
    lines = read("README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference to docs/"


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "bunpulse", "serving")),
                    reason="the layout of issue 20 (bunpulse/serving/) has not landed")
def test_the_code_layout_table_matches_the_folders():
    rows = re.findall(r"^\| `(bunpulse/[^`]+)` \|", read("docs/architecture.md"), re.M)
    missing = [row for row in rows if not os.path.exists(os.path.join(ROOT, row))]
    folders = tuple(row for row in rows if row.endswith("/"))
    unlisted = []
    for folder, _, files in os.walk(os.path.join(ROOT, "bunpulse")):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
            if not name.endswith(".py") or path in rows or path.startswith(folders):
                continue
            if name == "__init__.py" and path != "bunpulse/__init__.py":
                continue  # a package's marker
            unlisted.append(path)
    assert not missing and not unlisted, f"in the table, not in bunpulse/: {missing}; " \
                                         f"in bunpulse/, not in the table: {unlisted}"
