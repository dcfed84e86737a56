"""The ops team's deployment document (../shared/deployment-design.md), taken at its word.

Every shell command of its sections 3, 6, 8 and 9 (and the Compose files those sections show) is cut
into the names it relies on: Compose services, container names, the network, scripts, paths under
/opt/voicegrow, files next to deploy.sh, environment variables and HTTP endpoints. Each name must exist
in deploy/ (the layout checked in a real `deploy.sh --install-only`), or be listed, with its reason, in
the table "The deployment document, name by name" of docs/operations.md. Also: the layout of section
2.3, the environments of section 2.2 and the crontab of section 6.1.3.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import DEPLOY, REPO, SCRIPTS, ComposeLoader, compose, env_example, require_tool, script_env
from voicegrow.settings import read_env_file

DOCUMENT = REPO.parent / "shared" / "deployment-design.md"
PROJECT = compose("docker-compose.yml")["name"]
HOME = "/opt/voicegrow"
#: Words of the shell, not names of ours.
SHELL_VARIABLES = {"REPLY", "PWD", "HOME", "PATH"}
COMPOSE_SUBCOMMANDS = {"up", "down", "restart", "stop", "start", "logs", "ps", "pull", "build", "exec", "run"}


def document() -> str:
    if not DOCUMENT.is_file():
        pytest.fail(f"the deployment document is not at {DOCUMENT}")
    return DOCUMENT.read_text(encoding="utf-8")


def section(number: int) -> str:
    text = document()
    start = re.search(rf"^## {number}\. ", text, re.M)
    assert start, f"section {number} not found"
    end = re.search(r"^## ", text[start.end():], re.M)
    return text[start.start(): start.end() + end.start() if end else len(text)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def brace_expand(word: str) -> list[str]:
    """Bash brace expansion of one word (nested lists, no ranges): a/{b,c/{d,e}} -> a/b a/c/d a/c/e."""
    start = word.find("{")
    if start < 0:
        return [word]
    depth, parts, last = 0, [], start + 1
    for index in range(start, len(word)):
        char = word[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                parts.append(word[last:index])
                head, tail = word[:start], word[index + 1:]
                return [out for part in parts for out in brace_expand(head + part + tail)]
        elif char == "," and depth == 1:
            parts.append(word[last:index])
            last = index + 1
    return [word]


def commands(block: str) -> tuple[list[str], dict[str, str], list[str]]:
    """The block's commands (continuations joined, comments dropped), its variable assignments, and the
    scripts its header comments name (``# scripts/backup_mysql.sh``)."""
    headers = re.findall(r"^# (scripts/[\w.]+)$", block, re.M)
    joined = re.sub(r"\\\n\s*", " ", block)
    lines, assigned = [], {}
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)
        assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        if assignment:  # a local of the block; DATE=$(date ...) stays a variable part of paths
            value = assignment.group(2).strip('"')
            assigned[assignment.group(1)] = "$" + assignment.group(1) if "$(" in value else value
        lines.append(line)
    return lines, assigned, headers


def resolve(word: str, assigned: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: assigned.get(m.group(1), m.group(0)), word)


def names_in_block(block: str) -> set[tuple[str, str]]:
    """(kind, name) pairs used by one shell code block."""
    lines, assigned, headers = commands(block)
    found = {("script", Path(h).name) for h in headers}
    for line in lines:
        line = resolve(line, assigned)
        for part in re.split(r"\s*(?:\|\||&&|\||;)\s*", line):
            words = part.split()
            if not words:
                continue
            found |= names_in_command(words, assigned)
        for variable in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", line):
            if variable not in assigned and variable not in SHELL_VARIABLES:
                found.add(("variable", variable))
        for path in re.findall(rf"{HOME}[^\s\"';|):]*", line):
            for expanded in brace_expand(path):
                found.add(("path", expanded.rstrip("/") or HOME))
        for script in re.findall(r"(?:^|[\s/])scripts/([\w]+\.sh)\b", line):
            found.add(("script", script))
        for endpoint in re.findall(r"https?://localhost:8000(/\S*)", line):
            found.add(("endpoint", endpoint))
    return found


def names_in_command(words: list[str], assigned: dict[str, str]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    if words[0] == "docker-compose" and len(words) > 1 and words[1] in COMPOSE_SUBCOMMANDS:
        found.add(("command", "docker-compose"))
        operands = [w for w in words[2:] if not w.startswith("-")]
        found |= {("service", w) for w in operands if not w.startswith("<")}
    elif words[0] == "docker" and len(words) > 2 and words[1] in ("exec", "logs", "inspect"):
        operands = [w for w in words[2:] if not w.startswith("-") and not w.isdigit()]
        if operands:
            found.add(("container", operands[0]))
    elif words[0] == "docker" and words[1:3] == ["network", "inspect"]:
        found.add(("network", words[3]))
    elif words[0] == "grep" and words[-1].startswith("voicegrow-"):
        found.add(("container", words[-1]))
    elif words[0] == "cp":
        # deploy.sh (section 8.1.1) copies files that sit next to it into /opt/voicegrow.
        for source in [w for w in words[1:-1] if not w.startswith("-")]:
            found.add(("shipped", source.rstrip("*").rstrip("/")))
    return found


def document_names() -> dict[tuple[str, str], list[int]]:
    """Every (kind, name) of the shell blocks of sections 3, 6, 8 and 9, with the sections using it."""
    names: dict[tuple[str, str], list[int]] = {}
    for number in (3, 6, 8, 9):
        for block in code_blocks(section(number), "bash"):
            if number == 3:  # section 3.4 is the .env file itself
                used = {("variable", key) for key in re.findall(r"^([A-Z_][A-Z0-9_]*)=", block, re.M)}
            else:
                used = names_in_block(block)
            for name in used:
                names.setdefault(name, []).append(number)
        for block in code_blocks(section(number), "yaml"):
            for name in names_in_compose(yaml.load(block, Loader=ComposeLoader)):
                names.setdefault(name, []).append(number)
    return names


def names_in_compose(doc: dict) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for name, service in (doc.get("services") or {}).items():
        found.add(("service", name))
        if service.get("container_name"):
            found.add(("container", service["container_name"]))
        for network in service.get("networks") or ():
            found.add(("network", f"{PROJECT}_{network}"))
        for volume in service.get("volumes") or ():
            source = volume.split(":")[0]
            if source.startswith("./"):
                found.add(("path", f"{HOME}/{source[2:]}"))
        environment = service.get("environment") or {}
        if name == "server":
            found |= {("variable", key) for key in environment}
    return found


# --- what we have -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `deploy.sh --install-only` into a scratch /opt/voicegrow."""
    tmp = tmp_path_factory.mktemp("install")
    home = tmp / "opt-voicegrow"
    env = {**script_env(tmp), "VG_HOME": str(home)}
    env.pop("ENV_FILE")
    result = subprocess.run([str(SCRIPTS / "deploy.sh"), "--install-only", "--environment", "testing"], env=env,
                            capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    return home


def compose_services() -> set[str]:
    return set(compose("docker-compose.yml")["services"]) | set(compose("docker-compose.scale.yml")["services"])


def container_names() -> set[str]:
    services = [*compose("docker-compose.yml")["services"].values(), *compose("docker-compose.scale.yml")["services"].values()]
    return {s["container_name"] for s in services if s.get("container_name")}


def http_paths() -> set[str]:
    return set(re.findall(r'@app\.(?:get|post|put|delete)\("([^"]+)"', (REPO / "voicegrow" / "http" / "api.py").read_text()))


def exists(kind: str, name: str, home: Path) -> bool:
    if kind == "command":
        return False  # docker-compose (Compose v1's name): the table says which Compose to use
    if kind == "service":
        return name in compose_services()
    if kind == "container":
        return name in container_names()
    if kind == "network":
        return name in {f"{PROJECT}_{n}" for n in compose("docker-compose.yml")["networks"]}
    if kind == "script":
        return (SCRIPTS / name).is_file() and os.access(SCRIPTS / name, os.X_OK)
    if kind == "path":
        relative = name[len(HOME):].lstrip("/")
        if re.search(r"[*$]", relative):  # a pattern (voicegrow_${DATE}.sql, *.sql.gz): its directory must exist
            relative = relative[:re.search(r"[*$]", relative).start()].rsplit("/", 1)[0]
        return (home / relative).exists()
    if kind == "shipped":
        return (DEPLOY / name).exists()
    if kind == "variable":
        return name in env_example()
    if kind == "endpoint":
        return name in http_paths()
    raise AssertionError(kind)


def replacements() -> dict[tuple[str, str], str]:
    """The table of docs/operations.md: | kind | the document's name | here | why |."""
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    start = text.index("## The deployment document, name by name")
    table = {}
    for row in re.findall(r"^\| *(\w+) *\| *`([^`]+)` *\|(.*)\|(.*)\|$", text[start:], re.M):
        kind, name, here, why = row
        table[(kind, name)] = why.strip()
        assert here.strip() and why.strip(), f"{kind} {name}: the table needs what to use and why"
    return table


def test_every_name_of_the_documents_commands_exists_or_is_explained(installed: Path) -> None:
    names = document_names()
    assert len(names) > 60, "the document's commands were not found"
    # The names the issue names, so that a parser bug cannot pass this test by finding nothing.
    for must in [("service", "server"), ("container", "voicegrow-mysql"), ("container", "voicegrow-server"),
                 ("network", "voicegrow_voicegrow-net"), ("script", "restore_mysql.sh"),
                 ("variable", "MYSQL_ROOT_PASSWORD"), ("path", "/opt/voicegrow/backup/mysql")]:
        assert must in names, must
    table = replacements()
    unexplained = sorted(f"{kind} {name} (section {', '.join(map(str, sections))})"
                         for (kind, name), sections in names.items()
                         if not exists(kind, name, installed) and (kind, name) not in table)
    assert not unexplained, "names of the document that neither exist nor are explained in docs/operations.md:\n" + \
        "\n".join(unexplained)
    # (scripts/backup.sh is the section 2.3 layout's, checked by the layout test.)
    stale = sorted(f"{kind} {name}" for kind, name in table
                   if (kind, name) not in names and (kind, name) != ("script", "backup.sh"))
    assert not stale, f"docs/operations.md explains names the document does not use: {stale}"
    fine = sorted(f"{kind} {name}" for kind, name in table if exists(kind, name, installed))
    assert not fine, f"docs/operations.md explains names that exist as documented: {fine}"


def test_documented_names_the_issue_lists_exist_as_written(installed: Path) -> None:
    for kind, name in [("service", "server"), ("service", "mysql"), ("service", "redis"), ("service", "minio"),
                       ("container", "voicegrow-server"), ("container", "voicegrow-mysql"),
                       ("container", "voicegrow-redis"), ("container", "voicegrow-minio"),
                       ("network", "voicegrow_voicegrow-net"), ("variable", "MYSQL_ROOT_PASSWORD")]:
        assert exists(kind, name, installed), (kind, name)
    for script in ("backup_mysql.sh", "backup_minio.sh", "restore_mysql.sh", "deploy.sh", "update.sh",
                   "healthcheck.sh", "disaster_recovery.sh"):
        assert exists("script", script, installed) and (installed / "scripts" / script).stat().st_mode & stat.S_IXUSR


def test_install_makes_the_layout_of_section_2_3(installed: Path) -> None:
    tree = code_blocks(section(2), "")[-1]
    assert tree.startswith("/opt/voicegrow/")
    paths, stack = [], []
    for line in tree.splitlines()[1:]:
        match = re.match(r"^([│ ]*)[├└]── (\S+)", line)
        if not match:
            continue
        depth = len(match.group(1)) // 4
        stack[depth:] = [match.group(2).rstrip("/")]
        paths.append("/".join(stack))
    assert "scripts/backup.sh" in paths and "data/minio" in paths
    missing = [p for p in paths if not (installed / p).exists()]
    # The document's scripts/backup.sh is two scripts here (backup_mysql.sh, backup_minio.sh).
    assert missing == ["scripts/backup.sh"], missing
    assert ("script", "backup.sh") in replacements()
    assert (installed / "server" / "Dockerfile").is_file() and (installed / "server" / "voicegrow").is_dir()
    env_file = installed / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = read_env_file(env_file)
    assert values["ENVIRONMENT"] == "testing" and values["LOG_LEVEL"] == "INFO"
    assert values["MYSQL_ROOT_PASSWORD"] == "change-me", "the secrets stay for the operator to set"


def test_install_refreshes_files_but_keeps_env_and_edited_config(installed: Path, tmp_path: Path) -> None:
    env = {**script_env(tmp_path), "VG_HOME": str(installed)}
    env.pop("ENV_FILE")
    (installed / ".env").write_text((installed / ".env").read_text().replace("MYSQL_ROOT_PASSWORD=change-me",
                                                                            "MYSQL_ROOT_PASSWORD=kept-secret-123"))
    redis_conf = installed / "config" / "redis" / "redis.conf"
    redis_conf.write_text(redis_conf.read_text() + "\n# edited by the operator\n")
    (installed / "data" / "mysql" / "ibdata1").write_text("data")
    result = subprocess.run([str(SCRIPTS / "deploy.sh"), "--install-only", "--environment", "production"], env=env,
                            capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    values = read_env_file(installed / ".env")
    assert values["MYSQL_ROOT_PASSWORD"] == "kept-secret-123"
    assert (values["ENVIRONMENT"], values["LOG_LEVEL"]) == ("production", "WARNING")
    assert (installed / "data" / "mysql" / "ibdata1").read_text() == "data"
    assert redis_conf.read_text() == (DEPLOY / "config" / "redis" / "redis.conf").read_text()
    assert [p.read_text().endswith("# edited by the operator\n") for p in redis_conf.parent.glob("redis.conf.bak-*")] == [True]
    # The installed scripts know they are installed: their default env file is this .env.
    helped = subprocess.run([str(installed / "scripts" / "backup_mysql.sh"), "-h"], env=env, capture_output=True,
                            encoding="utf-8", timeout=60)
    assert helped.returncode == 0 and "Usage:" in helped.stdout


# --- environments (section 2.2) -------------------------------------------------------------------------

def environment_table() -> dict[str, dict[str, str]]:
    """Section 2.2's box: {setting: {Development: value, Testing: value, Production: value}}."""
    box = code_blocks(section(2), "")[0]
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in box.splitlines() if line.startswith("│")]
    header, *body = rows
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_environments_follow_section_2_2() -> None:
    table = environment_table()
    assert set(table) == {"DEBUG", "LOG_LEVEL", "REPLICAS", "SSL", "BACKUP", "MONITORING"}
    overlays = {name: read_env_file(DEPLOY / "environments" / f"{name}.env")
                for name in ("development", "testing", "staging", "production")}
    # Staging is "生产配置" (the production configuration) in section 2.1.
    assert {k: v for k, v in overlays["staging"].items() if k != "ENVIRONMENT"} == \
        {k: v for k, v in overlays["production"].items() if k != "ENVIRONMENT"}
    for column, name in (("Development", "development"), ("Testing", "testing"), ("Production", "production")):
        values = overlays[name]
        assert values["ENVIRONMENT"] == name
        assert values["DEBUG"] == table["DEBUG"][column].lower()
        assert values["LOG_LEVEL"] == table["LOG_LEVEL"][column]
        files = values["COMPOSE_FILE"].split(":")
        assert all((DEPLOY / f).is_file() for f in files)
        replicas = sum(1 for s in compose_services() if re.fullmatch(r"server(-\d+)?", s)) \
            if "docker-compose.scale.yml" in files else 1
        wanted = table["REPLICAS"][column]
        assert replicas >= int(wanted.rstrip("+")) and (wanted.endswith("+") or replicas == int(wanted)), name
        # SSL: nginx terminates TLS in the scale file only.
        assert ("docker-compose.scale.yml" in files) == (table["SSL"][column] == "Yes"), name
        schedule = {"No": "none", "Daily": "daily", "Hourly": "hourly"}[table["BACKUP"][column]]
        assert values["BACKUP_SCHEDULE"] == schedule, name
        monitoring = {"Basic": "", "Full": "monitoring"}[table["MONITORING"][column]]
        assert values["COMPOSE_PROFILES"] == monitoring, name
        for key in values:
            assert key in env_example() or key in ("COMPOSE_FILE", "COMPOSE_PROFILES", "BACKUP_SCHEDULE"), key
    hourly = (SCRIPTS / "crontab.hourly").read_text()
    assert re.search(r"^5 +\* +\* +\* +\* +/opt/voicegrow/scripts/backup_mysql\.sh ", hourly, re.M)


def test_crontab_is_section_6_1_3() -> None:
    documented = [line for line in code_blocks(section(6), "bash")[2].splitlines() if line and not line.startswith("#")]
    assert len(documented) == 2
    ours = [" ".join(line.split()) for line in (SCRIPTS / "crontab").read_text().splitlines()]
    for line in documented:
        assert " ".join(line.split()) in ours, line


def test_brace_expansion_of_deploy_sh_mkdir() -> None:
    assert brace_expand("/a/{b/{c,d},e}") == ["/a/b/c", "/a/b/d", "/a/e"]
    paths = [p for p, _ in itertools.groupby(brace_expand(
        "/opt/voicegrow/{config/{mysql,redis,nginx},data/{mysql,redis,minio,models},logs/{server,mysql},scripts,backup/{mysql,minio}}"))]
    assert len(paths) == 12 and "/opt/voicegrow/data/models" in paths


# --- section 5.2: the firewall scripts ------------------------------------------------------------------

FIREWALL = DEPLOY / "firewall"


def documented_ports(language: str) -> set[int]:
    blocks = code_blocks(section(5), language)
    return {int(p) for block in blocks for p in re.findall(r"(?:--dport|-LocalPort) (\d+)", block)}


def test_iptables_script_opens_what_the_stack_publishes_and_is_idempotent(tmp_path: Path) -> None:
    """Run for real in a fresh network namespace when this machine allows one; else its --dry-run."""
    require = subprocess.run([require_tool("shellcheck", "shellcheck"), str(FIREWALL / "iptables.sh")],
                             capture_output=True, encoding="utf-8")
    assert require.returncode == 0, require.stdout
    assert documented_ports("bash") == {22, 4399, 8000, 9000, 9001, 3306, 6379}
    script = str(FIREWALL / "iptables.sh")
    probe = subprocess.run(["unshare", "-n", "iptables", "-S"], capture_output=True, encoding="utf-8")
    if probe.returncode == 0:
        rules_file = tmp_path / "rules.v4"
        result = subprocess.run(["unshare", "-n", "bash", "-c",
                                 f"{script} --speakers 192.168.1.0/24 --save {rules_file} && {script} --save none "
                                 "--speakers 192.168.1.0/24 && iptables-save"],
                                capture_output=True, encoding="utf-8", timeout=60)
        assert result.returncode == 0, result.stderr
        rules = result.stdout
        assert rules.count("-A INPUT -j VOICEGROW-INPUT") == 1, "a second run must not add a second jump"
        assert "-A VOICEGROW-INPUT" in rules_file.read_text()
    else:
        result = subprocess.run([script, "--dry-run", "--speakers", "192.168.1.0/24"], capture_output=True,
                                encoding="utf-8", timeout=60)
        assert result.returncode == 0, result.stderr
        rules = result.stdout
    opened = {int(p) for p in re.findall(r"--dport (\d+) .*-j ACCEPT", rules)}
    assert opened == {22, 4399, 8000}, "3306, 6379, 9000 and 9001 are not published by the stack"
    assert re.search(r"-s 192\.168\.1\.0/24 .*--dport 4399|--dport 4399 .*-s 192\.168\.1\.0/24", rules)
    assert re.search(r"VOICEGROW-INPUT -j DROP", rules), "the document's default deny"
    assert re.search(r"! -s 192\.168\.1\.0/24 .*--ctorigdstport 4399.*-j DROP", rules), "Docker's ports too"
    bad = subprocess.run([script, "--dry-run", "--speakers", "everyone"], capture_output=True, encoding="utf-8")
    assert bad.returncode == 2 and "not an IPv4 address" in bad.stderr


def test_windows_firewall_script_opens_the_same_ports() -> None:
    """No PowerShell here: the script's rules are read, and checked against the document's cmdlets."""
    text = (FIREWALL / "windows-firewall.ps1").read_text(encoding="utf-8")
    assert documented_ports("powershell") == {4399, 8000, 9000, 9001}
    rules = re.findall(r"^\s*New-NetFirewallRule (.*)$", text, re.M)
    assert len(rules) == 3 and all("-Direction Inbound -Protocol TCP" in r and "-Action Allow" in r for r in rules)
    ports = [re.search(r"-LocalPort (\S+)", r).group(1) for r in rules]
    assert ports == ["$WsPort", "$HttpPort", "80,443,4443"]
    assert re.search(r"\[int\] \$WsPort = 4399", text) and re.search(r"\[int\] \$HttpPort = 8000", text)
    assert all("-RemoteAddress" in r for r in rules[:2]), "restricted to the given networks"
    assert "Remove-NetFirewallRule" in text and text.count('-Group "VoiceGrow"') == 5


def test_production_environment_runs_the_scale_file_and_wants_tls(tmp_path: Path) -> None:
    """The production overlay's COMPOSE_FILE makes the scripts use the scale file (replicas, nginx, TLS)."""
    from tests.test_deploy import FAKE_DOCKER, STACK_SECRETS

    if Path("/etc/voicegrow/certs/fullchain.pem").exists():
        pytest.skip("this machine has real certificates in /etc/voicegrow/certs")
    home = tmp_path / "opt-voicegrow"
    env = {**script_env(tmp_path), "VG_HOME": str(home)}
    env.pop("ENV_FILE")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_DOCKER_LOG=str(tmp_path / "docker.log"))
    made = subprocess.run([str(SCRIPTS / "deploy.sh"), "--environment", "production"], env=env, capture_output=True,
                          encoding="utf-8", timeout=120)
    assert made.returncode == 1 and "set its secrets" in made.stderr, made.stderr
    text = (home / ".env").read_text()
    for name, value in STACK_SECRETS.items():
        text = re.sub(rf"^{name}=.*$", f"{name}={value}", text, flags=re.M)
    (home / ".env").write_text(text)
    result = subprocess.run([str(home / "scripts" / "deploy.sh"), "--no-build"], env=env, capture_output=True,
                            encoding="utf-8", timeout=120)
    assert result.returncode == 1 and "/etc/voicegrow/certs/fullchain.pem is missing" in result.stderr, result.stderr
    updated = subprocess.run([str(home / "scripts" / "update.sh"), "--no-pull", "--no-backup", "--timeout", "1"],
                             env={**env, "FAKE_HAS_IMAGE": "1"}, capture_output=True, encoding="utf-8", timeout=120)
    assert updated.returncode == 0, updated.stderr
    log = (tmp_path / "docker.log").read_text()
    assert f"file {home}/docker-compose.scale.yml" in log
    assert [line.split()[-1] for line in log.splitlines() if "--force-recreate" in line] == ["server", "server-2", "server-3"]
