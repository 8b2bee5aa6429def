//! The built-in tools: what each one does, the JSON schema the model sees,
//! and running one call. They run inside the sandbox as the sandbox's user;
//! the sandbox is the boundary, so absolute paths are allowed.
//!
//! Must never: run a tool the caller has not checked against the turn's
//! allowlist (that check is in `turn`, before anything here is called), run
//! a command through a shell other than the `bash` tool's, or return
//! unbounded output to the model.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

/// Most characters of one tool result the model gets.
pub const MAX_OUTPUT: usize = 30_000;
/// Most bytes `read_file` returns.
const MAX_READ: usize = 100 * 1024;
/// Most entries `list_files` returns.
const MAX_ENTRIES: usize = 1000;
/// Most matching lines `search` returns.
const MAX_MATCHES: usize = 200;

/// One built-in tool as the model sees it.
#[derive(Debug, Clone)]
pub struct ToolDef {
    pub name: String,
    pub description: String,
    /// JSON Schema of the input object.
    pub schema: Value,
}

/// What a tool call gave: `ok = false` when it failed (the model sees the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    pub ok: bool,
    pub text: String,
}

impl ToolOutput {
    fn ok(text: impl Into<String>) -> ToolOutput {
        ToolOutput {
            ok: true,
            text: text.into(),
        }
    }
    fn err(text: impl Into<String>) -> ToolOutput {
        ToolOutput {
            ok: false,
            text: text.into(),
        }
    }
}

/// The definition of built-in tool `name` (`None`: no such tool).
pub fn definition(name: &str) -> Option<ToolDef> {
    let (description, schema) = match name {
        "bash" => (
            "Run a shell command with /bin/bash -c in the workspace (/workspace). Returns its output and exit status. Long-running commands are killed at the time limit.",
            json!({"type": "object", "properties": {
                "command": {"type": "string", "description": "The command line."}
            }, "required": ["command"]}),
        ),
        "read_file" => (
            "Read a text file. Paths are relative to /workspace unless absolute. Optionally from a 1-based line `offset`, at most `limit` lines.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "offset": {"type": "integer", "minimum": 1},
                "limit": {"type": "integer", "minimum": 1}
            }, "required": ["path"]}),
        ),
        "write_file" => (
            "Create or overwrite a file with the given content (parent directories are created). Paths are relative to /workspace unless absolute.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"}
            }, "required": ["path", "content"]}),
        ),
        "edit_file" => (
            "Replace an exact string in a file. `old_string` must occur exactly once unless `replace_all` is true.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "old_string": {"type": "string"},
                "new_string": {"type": "string"},
                "replace_all": {"type": "boolean"}
            }, "required": ["path", "old_string", "new_string"]}),
        ),
        "list_files" => (
            "List files and directories (directories end with /) under a path, default the workspace, to a depth (default 2, at most 6).",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "depth": {"type": "integer", "minimum": 1, "maximum": 6}
            }}),
        ),
        "search" => (
            "Search file contents for a regular expression (grep -E) under a path, default the workspace. Returns file:line:text lines.",
            json!({"type": "object", "properties": {
                "pattern": {"type": "string"},
                "path": {"type": "string"},
                "ignore_case": {"type": "boolean"},
                "include": {"type": "string", "description": "Only files whose name matches this glob, e.g. *.rs"}
            }, "required": ["pattern"]}),
        ),
        _ => return None,
    };
    Some(ToolDef {
        name: name.to_string(),
        description: description.to_string(),
        schema,
    })
}

/// Runs built-in tools in one workspace.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Where relative paths start and commands run (`/workspace` in a sandbox).
    pub root: PathBuf,
    /// Time limit of one command.
    pub timeout: Duration,
}

fn str_arg<'a>(input: &'a Value, key: &str) -> Result<&'a str, ToolOutput> {
    input.get(key).and_then(Value::as_str).ok_or_else(|| {
        ToolOutput::err(format!(
            "missing argument `{key}` (a string); the input was {}",
            shorten(&input.to_string(), 200)
        ))
    })
}

fn opt_u64(input: &Value, key: &str) -> Option<u64> {
    input.get(key).and_then(Value::as_u64)
}

impl Tools {
    /// Runs built-in tool `name`. The caller has checked the allowlist.
    pub fn run(&self, name: &str, input: &Value) -> ToolOutput {
        let r = match name {
            "bash" => self.bash(input),
            "read_file" => self.read_file(input),
            "write_file" => self.write_file(input),
            "edit_file" => self.edit_file(input),
            "list_files" => self.list_files(input),
            "search" => self.search(input),
            other => Err(ToolOutput::err(format!(
                "there is no built-in tool {other:?}"
            ))),
        };
        r.unwrap_or_else(|e| e)
    }

    fn path(&self, input: &Value, key: &str) -> Result<PathBuf, ToolOutput> {
        let p = str_arg(input, key)?;
        if p.is_empty() {
            return Err(ToolOutput::err(format!("`{key}` is empty")));
        }
        Ok(self.root.join(p))
    }

    fn bash(&self, input: &Value) -> Result<ToolOutput, ToolOutput> {
        let command = str_arg(input, "command")?;
        let shell = if Path::new("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        let mut cmd = Command::new(shell);
        cmd.arg("-c").arg(command).current_dir(&self.root);
        let r = run_command(cmd, self.timeout)
            .map_err(|e| ToolOutput::err(format!("could not start {shell}: {e}")))?;
        let mut text = r.stdout;
        if !r.stderr.is_empty() {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&r.stderr);
        }
        let text = cap_output(&text);
        Ok(if r.timed_out {
            ToolOutput::err(format!(
                "{text}\n(moat: the command was killed at the time limit of {} s)",
                self.timeout.as_secs()
            ))
        } else {
            match r.code {
                Some(0) => ToolOutput::ok(if text.is_empty() {
                    "(no output, exit status 0)".to_string()
                } else {
                    text
                }),
                Some(c) => ToolOutput::err(format!("{text}\n(exit status {c})")),
                None => ToolOutput::err(format!("{text}\n(killed by a signal)")),
            }
        })
    }

    fn read_file(&self, input: &Value) -> Result<ToolOutput, ToolOutput> {
        let path = self.path(input, "path")?;
        let bytes = std::fs::read(&path)
            .map_err(|e| ToolOutput::err(format!("cannot read {}: {e}", path.display())))?;
        if bytes.contains(&0) {
            return Err(ToolOutput::err(format!(
                "{} is a binary file ({} bytes)",
                path.display(),
                bytes.len()
            )));
        }
        let text = String::from_utf8_lossy(&bytes);
        let offset = opt_u64(input, "offset").unwrap_or(1).max(1) as usize;
        let limit = opt_u64(input, "limit").map(|l| l as usize);
        let mut out = String::new();
        let mut truncated = false;
        for (i, line) in text.split_inclusive('\n').enumerate().skip(offset - 1) {
            if limit.is_some_and(|l| i + 1 >= offset + l) {
                break;
            }
            if out.len() + line.len() > MAX_READ {
                truncated = true;
                out.push_str(&format!(
                    "\n(moat: stopped at line {} of a long file; read on with offset)",
                    i + 1
                ));
                break;
            }
            out.push_str(line);
        }
        if out.is_empty() && !truncated {
            out = if text.is_empty() {
                "(the file is empty)".into()
            } else {
                format!("(nothing at line {offset} or after)")
            };
        }
        Ok(ToolOutput::ok(out))
    }

    fn write_file(&self, input: &Value) -> Result<ToolOutput, ToolOutput> {
        let path = self.path(input, "path")?;
        let content = str_arg(input, "content")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ToolOutput::err(format!("cannot create {}: {e}", dir.display())))?;
        }
        std::fs::write(&path, content)
            .map_err(|e| ToolOutput::err(format!("cannot write {}: {e}", path.display())))?;
        Ok(ToolOutput::ok(format!(
            "wrote {} bytes to {}",
            content.len(),
            path.display()
        )))
    }

    fn edit_file(&self, input: &Value) -> Result<ToolOutput, ToolOutput> {
        let path = self.path(input, "path")?;
        let old = str_arg(input, "old_string")?;
        let new = str_arg(input, "new_string")?;
        let all = input
            .get("replace_all")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if old.is_empty() {
            return Err(ToolOutput::err(
                "`old_string` is empty; use write_file to create a file",
            ));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ToolOutput::err(format!("cannot read {}: {e}", path.display())))?;
        let n = text.matches(old).count();
        if n == 0 {
            return Err(ToolOutput::err(format!(
                "`old_string` does not occur in {}; read the file and copy the text exactly",
                path.display()
            )));
        }
        if n > 1 && !all {
            return Err(ToolOutput::err(format!(
                "`old_string` occurs {n} times in {}; give more context to make it unique, or set replace_all",
                path.display()
            )));
        }
        let out = if all {
            text.replace(old, new)
        } else {
            text.replacen(old, new, 1)
        };
        std::fs::write(&path, out)
            .map_err(|e| ToolOutput::err(format!("cannot write {}: {e}", path.display())))?;
        Ok(ToolOutput::ok(format!(
            "replaced {} occurrence{} in {}",
            if all { n } else { 1 },
            if all && n != 1 { "s" } else { "" },
            path.display()
        )))
    }

    fn list_files(&self, input: &Value) -> Result<ToolOutput, ToolOutput> {
        let base = match input.get("path").and_then(Value::as_str) {
            Some(p) if !p.is_empty() => self.root.join(p),
            _ => self.root.clone(),
        };
        let depth = opt_u64(input, "depth").unwrap_or(2).clamp(1, 6) as usize;
        let meta = std::fs::metadata(&base)
            .map_err(|e| ToolOutput::err(format!("cannot list {}: {e}", base.display())))?;
        if !meta.is_dir() {
            return Ok(ToolOutput::ok(format!(
                "{} is a file of {} bytes",
                base.display(),
                meta.len()
            )));
        }
        let mut out = Vec::new();
        let mut more = false;
        walk(&base, &base, depth, &mut out, &mut more);
        let mut text = out.join("\n");
        if text.is_empty() {
            text = format!("({} is empty)", base.display());
        }
        if more {
            text.push_str(&format!("\n(moat: stopped at {MAX_ENTRIES} entries)"));
        }
        Ok(ToolOutput::ok(text))
    }

    fn search(&self, input: &Value) -> Result<ToolOutput, ToolOutput> {
        let pattern = str_arg(input, "pattern")?;
        let base = match input.get("path").and_then(Value::as_str) {
            Some(p) if !p.is_empty() => self.root.join(p),
            _ => self.root.clone(),
        };
        let mut cmd = Command::new("grep");
        cmd.args(["-rnIE", "--exclude-dir=.git", "--color=never"]);
        if input.get("ignore_case").and_then(Value::as_bool) == Some(true) {
            cmd.arg("-i");
        }
        if let Some(g) = input.get("include").and_then(Value::as_str) {
            cmd.arg(format!("--include={g}"));
        }
        cmd.arg("-e").arg(pattern).arg("--").arg(&base);
        cmd.current_dir(&self.root);
        let r = run_command(cmd, self.timeout)
            .map_err(|e| ToolOutput::err(format!("could not run grep: {e}")))?;
        if r.timed_out {
            return Err(ToolOutput::err(format!(
                "the search was stopped at the time limit of {} s",
                self.timeout.as_secs()
            )));
        }
        match r.code {
            Some(0) => {
                let root = format!("{}/", self.root.display());
                let mut lines: Vec<&str> = r.stdout.lines().collect();
                let total = lines.len();
                lines.truncate(MAX_MATCHES);
                let mut text = lines
                    .iter()
                    .map(|l| l.strip_prefix(&root).unwrap_or(l))
                    .collect::<Vec<_>>()
                    .join("\n");
                if total > MAX_MATCHES {
                    text.push_str(&format!(
                        "\n(moat: {total} matching lines, the first {MAX_MATCHES} shown)"
                    ));
                }
                Ok(ToolOutput::ok(cap_output(&text)))
            }
            Some(1) => Ok(ToolOutput::ok("no matches")),
            _ => Err(ToolOutput::err(format!(
                "grep failed: {}",
                shorten(r.stderr.trim(), 500)
            ))),
        }
    }
}

/// Depth-first listing below `dir`, paths relative to `base`, sorted; `.git`
/// is shown but not entered. Symlinks are listed, not followed.
fn walk(base: &Path, dir: &Path, depth: usize, out: &mut Vec<String>, more: &mut bool) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if out.len() >= MAX_ENTRIES {
            *more = true;
            return;
        }
        let path = e.path();
        let rel = path
            .strip_prefix(base)
            .unwrap_or(&path)
            .display()
            .to_string();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            out.push(format!("{rel}/"));
            if depth > 1 && e.file_name() != ".git" {
                walk(base, &path, depth - 1, out, more);
            }
        } else {
            out.push(rel);
        }
    }
}

/// What a command did.
#[derive(Debug)]
pub struct CommandResult {
    /// Exit status; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

/// Most bytes kept of each output stream (the rest is read and dropped).
const MAX_STREAM: usize = 1024 * 1024;

/// Runs `cmd` in a process group of its own, standard input from /dev/null;
/// at `timeout` the whole group is killed (SIGKILL). Returns once the command
/// has exited and its output pipes are closed (or 1 s after it exited, if a
/// background process keeps them open).
pub fn run_command(mut cmd: Command, timeout: Duration) -> std::io::Result<CommandResult> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = child.id() as i32;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut p) = pipe {
                let mut buf = [0u8; 16384];
                loop {
                    match p.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let room = MAX_STREAM.saturating_sub(kept.len());
                            kept.extend_from_slice(&buf[..n.min(room)]);
                        }
                    }
                }
            }
            let _ = tx.send(kept);
        });
        rx
    };
    let out_rx = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_rx = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let (status, timed_out) = match done_rx.recv_timeout(timeout) {
        Ok(s) => (s?, false),
        Err(_) => {
            kill_group(pgid);
            let s = done_rx
                .recv()
                .map_err(|_| std::io::Error::other("the command's waiter thread died"))??;
            (s, true)
        }
    };
    let grace = if timed_out {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    Ok(CommandResult {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        timed_out,
    })
}

fn kill_group(pgid: i32) {
    if pgid > 1 {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// At most [`MAX_OUTPUT`] characters: the head and the tail, with a note
/// saying how much was left out.
pub fn cap_output(s: &str) -> String {
    let n = s.chars().count();
    if n <= MAX_OUTPUT {
        return s.to_string();
    }
    let head: String = s.chars().take(MAX_OUTPUT * 2 / 3).collect();
    let tail: String = s.chars().skip(n - MAX_OUTPUT / 3).collect();
    format!(
        "{head}\n(moat: {} characters left out)\n{tail}",
        n - MAX_OUTPUT * 2 / 3 - MAX_OUTPUT / 3
    )
}

/// The first `max` characters of `s`, with `…` when cut.
pub fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn tools() -> (tempfile::TempDir, Tools) {
        let d = tempfile::tempdir().unwrap();
        let t = Tools {
            root: d.path().to_path_buf(),
            timeout: Duration::from_secs(5),
        };
        (d, t)
    }

    #[test]
    fn every_builtin_tool_has_a_definition() {
        for n in crate::protocol::BUILTIN_TOOLS {
            let d = definition(n).unwrap();
            assert_eq!(d.schema["type"], "object", "{n}");
        }
        assert!(definition("find_thread").is_none());
    }

    #[test]
    fn write_read_edit_list() {
        let (d, t) = tools();
        let w = t.run(
            "write_file",
            &json!({"path": "a/b.txt", "content": "one\ntwo\nthree\n"}),
        );
        assert!(w.ok, "{w:?}");
        assert_eq!(
            std::fs::read_to_string(d.path().join("a/b.txt")).unwrap(),
            "one\ntwo\nthree\n"
        );
        assert_eq!(
            t.run("read_file", &json!({"path": "a/b.txt"})).text,
            "one\ntwo\nthree\n"
        );
        assert_eq!(
            t.run(
                "read_file",
                &json!({"path": "a/b.txt", "offset": 2, "limit": 1})
            )
            .text,
            "two\n"
        );
        let abs = d.path().join("a/b.txt");
        assert!(t.run("read_file", &json!({"path": abs})).ok);

        let e = t.run(
            "edit_file",
            &json!({"path": "a/b.txt", "old_string": "two", "new_string": "2"}),
        );
        assert!(e.ok, "{e:?}");
        assert_eq!(std::fs::read_to_string(&abs).unwrap(), "one\n2\nthree\n");
        // Not found, and not unique: nothing changes.
        std::fs::write(&abs, "x x\n").unwrap();
        let e = t.run(
            "edit_file",
            &json!({"path": "a/b.txt", "old_string": "x", "new_string": "y"}),
        );
        assert!(!e.ok && e.text.contains("2 times"), "{e:?}");
        let e = t.run(
            "edit_file",
            &json!({"path": "a/b.txt", "old_string": "zz", "new_string": "y"}),
        );
        assert!(!e.ok && e.text.contains("does not occur"), "{e:?}");
        assert_eq!(std::fs::read_to_string(&abs).unwrap(), "x x\n");
        let e = t.run(
            "edit_file",
            &json!({"path": "a/b.txt", "old_string": "x", "new_string": "y", "replace_all": true}),
        );
        assert!(e.ok, "{e:?}");
        assert_eq!(std::fs::read_to_string(&abs).unwrap(), "y y\n");

        std::fs::create_dir_all(d.path().join(".git/objects")).unwrap();
        let l = t.run("list_files", &json!({}));
        assert_eq!(l.text, ".git/\na/\na/b.txt", "{l:?}");
        let l = t.run("list_files", &json!({"depth": 1}));
        assert_eq!(l.text, ".git/\na/");
        assert!(!t.run("list_files", &json!({"path": "nope"})).ok);
        assert!(!t.run("read_file", &json!({"path": "nope"})).ok);
        assert!(!t.run("read_file", &json!({})).ok);
    }

    #[test]
    fn bash_runs_in_the_root_and_reports_status() {
        let (d, t) = tools();
        let r = t.run("bash", &json!({"command": "pwd; echo err >&2; exit 3"}));
        assert!(!r.ok);
        assert!(r.text.contains(&d.path().display().to_string()), "{r:?}");
        assert!(
            r.text.contains("err") && r.text.contains("exit status 3"),
            "{r:?}"
        );
        let r = t.run("bash", &json!({"command": "true"}));
        assert_eq!(r, ToolOutput::ok("(no output, exit status 0)"));
    }

    #[test]
    fn bash_timeout_kills_the_whole_group() {
        let (d, mut t) = tools();
        t.timeout = Duration::from_millis(300);
        let tag = format!("moat-agent-test-{}", std::process::id());
        let t0 = Instant::now();
        let r = t.run(
            "bash",
            &json!({"command": format!("(exec -a {tag} sleep 30) & echo started; wait")}),
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(!r.ok && r.text.contains("time limit"), "{r:?}");
        assert!(r.text.contains("started"), "{r:?}");
        std::thread::sleep(Duration::from_millis(100));
        let ps = Command::new("pgrep").args(["-f", &tag]).output().unwrap();
        assert!(ps.stdout.is_empty(), "still running: {:?}", ps);
        drop(d);
    }

    #[test]
    fn search_finds_lines_and_says_when_nothing() {
        let (d, t) = tools();
        std::fs::write(d.path().join("x.rs"), "fn main() {}\nlet needle = 1;\n").unwrap();
        std::fs::write(d.path().join("y.txt"), "NEEDLE here\n").unwrap();
        let r = t.run("search", &json!({"pattern": "needle"}));
        assert_eq!(r, ToolOutput::ok("x.rs:2:let needle = 1;"));
        let r = t.run("search", &json!({"pattern": "needle", "ignore_case": true}));
        assert!(
            r.text.contains("y.txt:1:NEEDLE here") && r.text.contains("x.rs"),
            "{r:?}"
        );
        let r = t.run(
            "search",
            &json!({"pattern": "needle", "ignore_case": true, "include": "*.txt"}),
        );
        assert_eq!(r.text, "y.txt:1:NEEDLE here");
        assert_eq!(
            t.run("search", &json!({"pattern": "absent"})).text,
            "no matches"
        );
        assert!(!t.run("search", &json!({"pattern": "("})).ok);
    }

    #[test]
    fn output_is_capped() {
        let s = "x".repeat(MAX_OUTPUT * 3);
        let c = cap_output(&s);
        assert!(c.chars().count() < MAX_OUTPUT + 100);
        assert!(c.contains("characters left out"));
    }
}
