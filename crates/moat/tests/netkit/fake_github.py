# A fake GitHub for moat's GitHub tests, run on the host by the tests (plain
# HTTP on 127.0.0.1, random port). Written from GitHub's public REST docs
# ("Create an installation access token for an app", "Revoke an installation
# access token", "Get a repository", "Git references", "Repository contents",
# "Merge a branch", "Merge a pull request", GraphQL) and git's smart HTTP
# protocol (served by `git http-backend` as a CGI).
#
# It owns: checking the App JWT (RS256 against the App's public key, with the
# openssl CLI; iss, iat, exp), minting and revoking installation tokens scoped
# to repositories and permissions, enforcing them on every request, and
# logging every request and event as one JSON line in LOG. It must never
# contact anything but the local git repositories under GIT_ROOT.
#
# Usage: fake_github.py APP_ID INSTALLATION_ID PUBLIC_KEY_PEM OWNER REPOS GIT_ROOT LOG
#   REPOS: comma-separated names the installation can reach; the bare
#   repository of NAME is GIT_ROOT/OWNER/NAME.git.
# Listens on two ports, "web" (github.com: git) and "api" (api.github.com),
# both serving everything; prints {"web": PORT, "api": PORT} on stdout once
# listening. Owner and repository names match case-insensitively, API paths
# are percent-decoded before routing and /repositories/ID stands for the
# repository with that id (1000, 1001, ...), as on GitHub.
#
# LOG records:
#   {"kind":"request", "server" ("web" or "api"), "method", "path" (with
#    query), "headers" {lower: value},
#    "body" (text, API requests only), "body_len", "commands" (ref updates of a
#    receive-pack request), "status", "why" (for refusals)}
#   {"kind":"minted", "token", "jwt", "expires_at", "expires_at_unix",
#    "repositories", "permissions"}
#   {"kind":"revoked", "token"}
#   {"kind":"pull", "repo", "number", "head", "base", "title", "via" ("rest"
#    or "graphql")}
#   {"kind":"graphql", "query" (first 2000 characters), "variables"}
#   {"kind":"jwt-refused", "why"}
import base64
import gzip
import http.server
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

APP_ID, INSTALLATION, PUBKEY, OWNER, REPOS, GIT_ROOT, LOG = sys.argv[1:8]
REPOS = [r for r in REPOS.split(",") if r]
KNOWN_PERMISSIONS = {
    "contents", "pull_requests", "metadata", "issues", "actions", "checks",
    "statuses", "workflows", "deployments",
}
LEVELS = {"read": 1, "write": 2, "admin": 3}

_lock = threading.Lock()
# token -> {"repositories": [...], "permissions": {...}, "expires": unix, "revoked": bool}
TOKENS = {}
# repo -> the last pull request number
PULLS = {}


def log(record):
    record["ts"] = time.time()
    with _lock:
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def b64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def check_jwt(jwt):
    """None if `jwt` is a valid App JWT for APP_ID, else why not."""
    parts = jwt.split(".")
    if len(parts) != 3:
        return "not a JWT"
    try:
        header = json.loads(b64url(parts[0]))
        claims = json.loads(b64url(parts[1]))
        sig = b64url(parts[2])
    except Exception as e:  # noqa: BLE001 - any decoding error refuses
        return "undecodable JWT: %s" % e
    if header.get("alg") != "RS256":
        return "alg is %r, not RS256" % header.get("alg")
    with tempfile.NamedTemporaryFile() as f:
        f.write(sig)
        f.flush()
        r = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", PUBKEY, "-signature", f.name],
            input=(parts[0] + "." + parts[1]).encode(),
            capture_output=True,
        )
    if r.returncode != 0:
        return "bad signature"
    if str(claims.get("iss")) != APP_ID:
        return "iss %r is not the App ID" % claims.get("iss")
    now = int(time.time())
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int) or not isinstance(exp, int):
        return "iat or exp missing"
    # GitHub: iat a little in the past (clock drift), exp at most 10 minutes
    # after it.
    if iat > now - 30 or iat < now - 300:
        return "iat %d not 30 s to 5 min before now (%d)" % (iat, now)
    if exp <= now or exp > iat + 11 * 60:
        return "exp %d expired or more than 11 min after iat %d" % (exp, iat)
    return None


def git(*args, **kw):
    return subprocess.run(
        ["git", "-c", "safe.directory=*"] + list(args),
        capture_output=True, timeout=60, **kw,
    )


def repo_dir(name):
    return os.path.join(GIT_ROOT, OWNER, name + ".git")


def canon(owner, repo):
    """The installation's name for OWNER/REPO (any case), or None."""
    if owner.lower() != OWNER.lower():
        return None
    return next((r for r in REPOS if r.lower() == repo.lower()), None)


def pkt_commands(body):
    """The ref updates at the start of a receive-pack request body."""
    out, pos = [], 0
    while pos + 4 <= len(body):
        try:
            n = int(body[pos:pos + 4], 16)
        except ValueError:
            break
        if n == 0:
            break
        line = body[pos + 4:pos + n].split(b"\0")[0].decode("latin-1").strip()
        words = line.split(" ")
        if len(words) == 3:
            out.append({"old": words[0], "new": words[1], "ref": words[2]})
        pos += n
    return out



def open_pull(repo, head, base, title, via):
    """Opens pull request N of `repo` from branch `head` (GitHub refuses a
    head that does not exist): (N, link), or (None, None)."""
    d = repo_dir(repo)
    if git("--git-dir", d, "rev-parse", "--verify", "-q", "refs/heads/" + head).returncode != 0:
        return None, None
    with _lock:
        PULLS.setdefault(repo, 0)
        PULLS[repo] += 1
        number = PULLS[repo]
    url = "https://github.com/%s/%s/pull/%d" % (OWNER, repo, number)
    log({"kind": "pull", "repo": repo, "number": number, "head": head, "base": base,
         "title": title, "via": via})
    return number, url

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- plumbing --------------------------------------------------------

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status, body, headers=(), why=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = list(headers) + [("Content-Type", "application/json; charset=utf-8")]
        self.rec["status"] = status
        if why:
            self.rec["why"] = why
        log(self.rec)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def fail(self, status, message, why=None, headers=()):
        self.send(status, {"message": message,
                           "documentation_url": "https://docs.github.com/rest"},
                  headers, why or message)

    def token_from(self, schemes):
        """The valid token in Authorization, or None."""
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        scheme = scheme.lower()
        token = None
        if scheme in schemes and scheme in ("bearer", "token"):
            token = value.strip()
        elif scheme in schemes and scheme == "basic":
            try:
                user, _, pw = base64.b64decode(value.strip()).decode().partition(":")
            except Exception:  # noqa: BLE001
                return None
            if user != "x-access-token":
                return None
            token = pw
        t = TOKENS.get(token)
        if not t or t["revoked"] or t["expires"] <= time.time():
            return None
        return token

    def allowed(self, token, repo, permission, level):
        t = TOKENS[token]
        if repo is not None and repo not in t["repositories"]:
            return False
        if permission is None:
            return True
        have = t["permissions"].get(permission)
        return have is not None and LEVELS[have] >= LEVELS[level]

    # -- dispatch --------------------------------------------------------

    def any(self):
        body = self.read_body()
        path, _, query = self.path.partition("?")
        self.rec = {
            "kind": "request", "server": self.server.name,
            "method": self.command, "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_len": len(body),
        }
        delay = self.headers.get("X-Test-Delay")
        if delay:
            time.sleep(float(delay))
        m = re.match(r"^/([^/]+)/([^/]+?)(?:\.git)?/(info/refs|git-upload-pack|git-receive-pack)$", path)
        if m:
            return self.git(m.group(1), m.group(2), m.group(3), query, body)
        try:
            self.rec["body"] = body.decode()
            doc = json.loads(body) if body else {}
        except (UnicodeDecodeError, ValueError):
            self.rec["body"] = repr(body[:4096])
            doc = None
        if path == "/" and self.command in ("GET", "HEAD"):
            return self.send(200, b"<html>fake github</html>\n", [("Content-Type", "text/html")])
        if path == "/app/installations/%s/access_tokens" % INSTALLATION and self.command == "POST":
            return self.mint(doc)
        if path == "/installation/token" and self.command == "DELETE":
            return self.revoke()
        if path == "/graphql" and self.command == "POST":
            return self.graphql(doc)
        path = urllib.parse.unquote(path)
        m = re.match(r"^/repos/([^/]+)/([^/]+)(/.*)?$", path)
        if m:
            return self.repo_api(m.group(1), m.group(2), m.group(3) or "", doc)
        m = re.match(r"^/repositories/(\d+)(/.*)?$", path)
        if m and 0 <= int(m.group(1)) - 1000 < len(REPOS):
            return self.repo_api(OWNER, REPOS[int(m.group(1)) - 1000], m.group(2) or "", doc)
        return self.fail(404, "Not Found")

    do_GET = do_POST = do_HEAD = do_PUT = do_PATCH = do_DELETE = any

    # -- the App's token endpoints ---------------------------------------

    def mint(self, doc):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return self.fail(401, "A JSON web token could not be decoded", "no Bearer JWT")
        jwt = auth[len("Bearer "):]
        why = check_jwt(jwt)
        if why:
            log({"kind": "jwt-refused", "why": why})
            return self.fail(401, "A JSON web token could not be decoded", why)
        if not isinstance(doc, dict):
            return self.fail(400, "Problems parsing JSON")
        repos = doc.get("repositories")
        perms = doc.get("permissions")
        if not isinstance(repos, list) or not repos:
            return self.fail(422, "repositories must be a non-empty list (moat must down-scope)")
        if not isinstance(perms, dict) or not perms:
            return self.fail(422, "permissions must be a non-empty object (moat must down-scope)")
        for r in repos:
            if r not in REPOS:
                return self.fail(422, "There is at least one repository that does not exist or is not accessible to the parent installation.", "repository %r not in the installation" % r)
        for k, v in perms.items():
            if k not in KNOWN_PERMISSIONS or v not in LEVELS:
                return self.fail(422, "The permissions requested are not granted to this installation.", "permission %r=%r" % (k, v))
        token = "ghs_" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") for _ in range(36))
        expires = int(time.time()) + 3600
        TOKENS[token] = {"repositories": list(repos), "permissions": dict(perms),
                         "expires": expires, "revoked": False}
        log({"kind": "minted", "token": token, "jwt": jwt, "expires_at": rfc3339(expires),
             "expires_at_unix": expires, "repositories": repos, "permissions": perms})
        self.send(201, {
            "token": token, "expires_at": rfc3339(expires), "permissions": perms,
            "repository_selection": "selected",
            "repositories": [{"name": r, "full_name": OWNER + "/" + r, "private": True} for r in repos],
        })

    def revoke(self):
        token = self.token_from(("bearer", "token"))
        if not token:
            return self.fail(401, "Bad credentials")
        TOKENS[token]["revoked"] = True
        log({"kind": "revoked", "token": token})
        self.send(204, b"")

    # -- REST ------------------------------------------------------------

    def repo_api(self, owner, repo, rest, doc):
        token = self.token_from(("bearer", "token"))
        if not token:
            return self.fail(401, "Bad credentials")
        repo = canon(owner, repo)
        if repo is None or not self.allowed(token, repo, None, None):
            return self.fail(404, "Not Found", "repository %s/%s not reachable with this token" % (owner, repo))
        owner = OWNER
        d = repo_dir(repo)
        method = self.command
        if rest == "" and method == "GET":
            return self.send(200, {
                "id": 1000 + REPOS.index(repo), "name": repo, "full_name": owner + "/" + repo,
                "private": True, "owner": {"login": owner, "type": "Organization"},
                "default_branch": "main", "visibility": "private",
            })
        if rest == "/pulls" and method == "POST":
            # Opening a pull request needs pull_requests:write; head must be
            # a branch that exists (GitHub's 422 otherwise).
            if not self.allowed(token, repo, "pull_requests", "write"):
                return self.fail(403, "Resource not accessible by integration", "pull_requests:write missing")
            if doc is None:
                return self.fail(400, "Problems parsing JSON")
            head = str(doc.get("head", "")).split(":")[-1]
            base = str(doc.get("base", "main"))
            number, url = open_pull(repo, head, base, str(doc.get("title", "")), "rest")
            if number is None:
                return self.fail(422, "Validation Failed", "head %r does not exist" % head)
            return self.send(201, {
                "number": number, "html_url": url, "state": "open",
                "title": doc.get("title", ""), "head": {"ref": head}, "base": {"ref": base},
            })
        write = method in ("POST", "PUT", "PATCH", "DELETE")
        if write and not self.allowed(token, repo, "contents", "write"):
            return self.fail(403, "Resource not accessible by integration", "contents:write missing")
        if method == "GET":
            return self.send(200, {"path": rest})
        if doc is None:
            return self.fail(400, "Problems parsing JSON")
        m = re.match(r"^/git/refs/(heads/.+)$", rest)
        if m and method in ("PATCH", "DELETE"):
            ref = "refs/" + m.group(1)
            if method == "DELETE":
                r = git("--git-dir", d, "update-ref", "-d", ref)
                return self.send(204, b"") if r.returncode == 0 else self.fail(422, "Reference does not exist")
            r = git("--git-dir", d, "update-ref", ref, str(doc.get("sha", "")))
            if r.returncode != 0:
                return self.fail(422, "Update is not a fast forward", r.stderr.decode())
            return self.send(200, {"ref": ref, "object": {"sha": doc["sha"], "type": "commit"}})
        if rest == "/git/refs" and method == "POST":
            r = git("--git-dir", d, "update-ref", str(doc.get("ref", "")), str(doc.get("sha", "")), "")
            if r.returncode != 0:
                return self.fail(422, "Reference already exists", r.stderr.decode())
            return self.send(201, {"ref": doc["ref"], "object": {"sha": doc["sha"], "type": "commit"}})
        m = re.match(r"^/contents/(.+)$", rest)
        if m and method in ("PUT", "DELETE"):
            return self.contents(d, m.group(1), doc)
        if rest == "/merges" and method == "POST":
            return self.send(201, {"sha": "0" * 40, "commit": {"message": doc.get("commit_message", "")}})
        if re.match(r"^/pulls/\d+/merge$", rest) and method == "PUT":
            return self.send(200, {"sha": "0" * 40, "merged": True, "message": "Pull Request successfully merged"})
        return self.fail(404, "Not Found")

    def contents(self, d, path, doc):
        """Create, update or delete one file with a commit on `branch`
        (default: the default branch, main), as GitHub does."""
        branch = doc.get("branch") or "main"
        ref = "refs/heads/" + branch
        parent = git("--git-dir", d, "rev-parse", "--verify", "-q", ref).stdout.decode().strip()
        if not parent:
            return self.fail(404, "Branch %s not found" % branch)
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"),
                       GIT_AUTHOR_NAME="fake github", GIT_AUTHOR_EMAIL="fake@github.invalid",
                       GIT_COMMITTER_NAME="fake github", GIT_COMMITTER_EMAIL="fake@github.invalid")
            git("--git-dir", d, "read-tree", parent, env=env)
            if self.command == "PUT":
                blob = git("--git-dir", d, "hash-object", "-w", "--stdin",
                           input=base64.b64decode(doc.get("content", ""))).stdout.decode().strip()
                git("--git-dir", d, "update-index", "--add", "--cacheinfo", "100644,%s,%s" % (blob, path), env=env)
            else:
                git("--git-dir", d, "update-index", "--force-remove", path, env=env)
            tree = git("--git-dir", d, "write-tree", env=env).stdout.decode().strip()
            commit = git("--git-dir", d, "commit-tree", tree, "-p", parent, "-m",
                         doc.get("message", "update"), env=env).stdout.decode().strip()
            r = git("--git-dir", d, "update-ref", ref, commit, parent)
            if r.returncode != 0 or not commit:
                return self.fail(409, "Conflict", r.stderr.decode())
        self.send(201 if self.command == "PUT" else 200,
                  {"content": {"path": path}, "commit": {"sha": commit, "message": doc.get("message")}})

    def graphql(self, doc):
        """GraphQL as `gh pr create` uses it (GitHub's GraphQL reference:
        the `repository` and `viewer` queries, the `createPullRequest`
        mutation). Queries get one repository object holding every field gh
        asks for (unknown fields are ignored by clients); repositories are
        found by `owner`/`name` variables and node ids `R_<id>`."""
        token = self.token_from(("bearer", "token"))
        if not token:
            return self.fail(401, "Bad credentials")
        doc = doc if isinstance(doc, dict) else {}
        q = doc.get("query", "") if isinstance(doc.get("query"), str) else ""
        var = doc.get("variables") if isinstance(doc.get("variables"), dict) else {}
        log({"kind": "graphql", "query": q[:2000], "variables": var})
        if "createPullRequest" in q:
            inp = var.get("input") if isinstance(var.get("input"), dict) else {}
            rid = str(inp.get("repositoryId", ""))
            m = re.match(r"^R_(\d+)$", rid)
            idx = int(m.group(1)) - 1000 if m else -1
            if not 0 <= idx < len(REPOS):
                return self.send(200, {"data": None, "errors": [{"message": "Could not resolve to a node with the global id of '%s'" % rid}]})
            repo = REPOS[idx]
            if not self.allowed(token, repo, None, None):
                return self.send(200, {"data": None, "errors": [{"type": "NOT_FOUND", "message": "Could not resolve to a Repository"}]})
            if not self.allowed(token, repo, "pull_requests", "write"):
                return self.send(200, {"data": None, "errors": [{"type": "FORBIDDEN", "message": "Resource not accessible by integration"}]})
            head = str(inp.get("headRefName", "")).split(":")[-1]
            number, url = open_pull(repo, head, str(inp.get("baseRefName", "main")),
                                    str(inp.get("title", "")), "graphql")
            if number is None:
                return self.send(200, {"data": None, "errors": [{"message": "Head sha can't be blank, Base sha can't be blank, No commits between main and %s, Head ref must be a branch" % head}]})
            return self.send(200, {"data": {"createPullRequest": {"pullRequest": {
                "id": "PR_%d" % number, "url": url, "number": number}}}})
        if q.lstrip().startswith("mutation"):
            return self.send(200, {"data": {"mutation": "accepted by the fake"}})
        name = str(var.get("name") or var.get("repo") or REPOS[0])
        repo = canon(OWNER, name)
        data = {"viewer": {"login": "moat-test[bot]", "id": "U_1"}}
        if repo is not None and self.allowed(token, repo, None, None):
            data["repository"] = {
                "id": "R_%d" % (1000 + REPOS.index(repo)), "databaseId": 1000 + REPOS.index(repo),
                "name": repo, "nameWithOwner": "%s/%s" % (OWNER, repo),
                "owner": {"login": OWNER, "id": "O_1"}, "url": "https://github.com/%s/%s" % (OWNER, repo),
                "isPrivate": True, "isFork": False, "isArchived": False, "description": "",
                "hasIssuesEnabled": True, "hasWikiEnabled": False, "hasProjectsEnabled": False,
                "hasDiscussionsEnabled": False, "viewerPermission": "WRITE",
                "defaultBranchRef": {"name": "main"}, "parent": None,
                "mergeCommitAllowed": True, "rebaseMergeAllowed": True, "squashMergeAllowed": True,
                "pullRequests": {"nodes": [], "totalCount": 0, "pageInfo": {"hasNextPage": False, "endCursor": None}},
                "pullRequest": None,
                "assignableUsers": {"nodes": [], "pageInfo": {"hasNextPage": False, "endCursor": None}},
                "labels": {"nodes": [], "pageInfo": {"hasNextPage": False, "endCursor": None}},
                "milestones": {"nodes": [], "pageInfo": {"hasNextPage": False, "endCursor": None}},
                "projects": {"nodes": [], "pageInfo": {"hasNextPage": False, "endCursor": None}},
                "projectsV2": {"nodes": [], "pageInfo": {"hasNextPage": False, "endCursor": None}},
            }
        else:
            data["repository"] = None
        return self.send(200, {"data": data})

    # -- git smart HTTP --------------------------------------------------

    def git(self, owner, repo, what, query, body):
        service = what if what != "info/refs" else dict(
            p.partition("=")[::2] for p in query.split("&")).get("service", "")
        if self.command == "POST" and service == "git-receive-pack":
            raw = body
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                raw = gzip.decompress(body)
            self.rec["commands"] = pkt_commands(raw)
        challenge = [("WWW-Authenticate", 'Basic realm="GitHub"')]
        token = self.token_from(("basic",))
        if not token:
            return self.fail(401, "Invalid username or token", "git without a valid Basic x-access-token", challenge)
        repo = canon(owner, repo)
        if repo is None or not self.allowed(token, repo, None, None):
            return self.fail(404, "Repository not found")
        owner = OWNER
        need = "write" if service == "git-receive-pack" else "read"
        if not self.allowed(token, repo, "contents", need):
            return self.fail(403, "Permission to %s/%s.git denied" % (owner, repo), "contents:%s missing" % need)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": GIT_ROOT,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": "/%s/%s.git/%s" % (owner, repo, what),
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_USER": "x-access-token",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        for h in ("Content-Encoding", "Git-Protocol"):
            if self.headers.get(h):
                env["HTTP_" + h.upper().replace("-", "_")] = self.headers[h]
        out = subprocess.run(
            ["git", "-c", "safe.directory=*", "-c", "http.receivepack=true", "http-backend"],
            input=body, env=env, capture_output=True, timeout=120,
        )
        head, sep, rest = out.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, _, rest = out.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip().split()[0])
            elif k:
                headers.append((k, v.strip()))
        if out.returncode != 0 and status == 200:
            self.rec["backend_error"] = out.stderr.decode(errors="replace")[-2000:]
        self.send(status, rest, headers)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name):
        self.name = name
        super().__init__(("127.0.0.1", 0), Handler)


web, api = Server("web"), Server("api")
threading.Thread(target=web.serve_forever, daemon=True).start()
sys.stdout.write(json.dumps({"web": web.server_address[1], "api": api.server_address[1]}) + "\n")
sys.stdout.flush()
api.serve_forever()
