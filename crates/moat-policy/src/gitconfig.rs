//! Which git configuration a sandbox may leave in a host workspace (threat
//! model F8), decided on text alone.
//!
//! Owns the allowlist of configuration keys that cannot make git run a program
//! (`core.fsmonitor`, `core.hooksPath`, `diff.*.textconv`, `filter.*.clean`,
//! `include.path`, ... all can), a parser for git's configuration syntax, and
//! the rewrite of a file down to its allowed entries. An allowlist, not a
//! denylist: a key git adds tomorrow is dropped until someone looks at it.
//!
//! Must never do I/O (the caller reads and writes files), and must never pass
//! through text it did not parse: a rewritten file holds only entries this
//! module wrote itself, so git reads exactly what was judged.

/// One `section.subsection.key = value` entry as git would read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Lower-cased section name (`remote`).
    pub section: String,
    /// Case-sensitive subsection (`origin`), if any.
    pub subsection: Option<String>,
    /// Lower-cased key (`url`).
    pub key: String,
    /// `None` for a bare `key` line (boolean true).
    pub value: Option<String>,
}

impl Entry {
    /// `section.subsection.key` as git prints it.
    pub fn name(&self) -> String {
        match &self.subsection {
            Some(s) => format!("{}.{}.{}", self.section, s, self.key),
            None => format!("{}.{}", self.section, self.key),
        }
    }
}

/// What [`sanitize`] decided for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every entry is allowed: leave the file as it is.
    Keep,
    /// Write `text` instead; `removed` names what was dropped (never values).
    Rewrite { text: String, removed: Vec<String> },
}

/// Keys allowed without a subsection, as `section.key` (lower case).
const PLAIN: &[&str] = &[
    "core.repositoryformatversion",
    "core.filemode",
    "core.bare",
    "core.logallrefupdates",
    "core.ignorecase",
    "core.precomposeunicode",
    "core.symlinks",
    "core.autocrlf",
    "core.eol",
    "core.safecrlf",
    "core.quotepath",
    "core.compression",
    "core.loosecompression",
    "core.bigfilethreshold",
    "core.checkstat",
    "core.trustctime",
    "core.sparsecheckout",
    "core.sparsecheckoutcone",
    "core.splitindex",
    "core.untrackedcache",
    "core.abbrev",
    "core.commentchar",
    "core.whitespace",
    "core.preloadindex",
    "user.name",
    "user.email",
    "author.name",
    "author.email",
    "committer.name",
    "committer.email",
    "init.defaultbranch",
    "push.default",
    "push.autosetupremote",
    "pull.rebase",
    "pull.ff",
    "fetch.prune",
    "fetch.prunetags",
    "merge.ff",
    "merge.conflictstyle",
    "diff.renames",
    "diff.algorithm",
    "diff.context",
    "diff.mnemonicprefix",
    "diff.noprefix",
    "index.version",
    "gc.auto",
    "status.showuntrackedfiles",
    "advice.detachedhead",
];

/// Keys allowed under any subsection, as (section, key).
const SUBSECTION: &[(&str, &str)] = &[
    ("remote", "url"),
    ("remote", "pushurl"),
    ("remote", "fetch"),
    ("remote", "push"),
    ("remote", "tagopt"),
    ("remote", "mirror"),
    ("remote", "prune"),
    ("remote", "prunetags"),
    ("remote", "promisor"),
    ("remote", "partialclonefilter"),
    ("branch", "remote"),
    ("branch", "pushremote"),
    ("branch", "merge"),
    ("branch", "rebase"),
    ("branch", "description"),
    ("submodule", "url"),
    ("submodule", "active"),
    ("submodule", "branch"),
    ("submodule", "shallow"),
    ("submodule", "fetchrecursesubmodules"),
    ("submodule", "ignore"),
    ("submodule", "update"),
];

/// Whether git could run a program because of this entry (the value matters
/// for a few keys: `submodule.*.update = !cmd`, `ext::` remote URLs).
pub fn is_allowed(e: &Entry) -> bool {
    if e.section == "extensions" && e.subsection.is_none() {
        return true;
    }
    let known = match &e.subsection {
        None => PLAIN.contains(&format!("{}.{}", e.section, e.key).as_str()),
        Some(_) => SUBSECTION.contains(&(e.section.as_str(), e.key.as_str())),
    };
    if !known {
        return false;
    }
    let v = e.value.as_deref().unwrap_or("");
    match (e.section.as_str(), e.key.as_str()) {
        ("submodule", "update") => matches!(v, "checkout" | "rebase" | "merge" | "none"),
        ("remote", "url" | "pushurl") | ("submodule", "url") => {
            let lower = v.to_ascii_lowercase();
            !(lower.starts_with("ext::") || lower.starts_with("fd::") || v.starts_with('-'))
        }
        _ => true,
    }
}

/// Judges a configuration file's text. Text that does not parse as git
/// configuration keeps only the entries before the first error (git itself
/// refuses such a file, so nothing is lost that git would have used).
pub fn sanitize(text: &str) -> Verdict {
    let (entries, bad) = parse(text);
    let removed: Vec<String> = entries
        .iter()
        .filter(|e| !is_allowed(e))
        .map(Entry::name)
        .collect();
    if removed.is_empty() && !bad {
        return Verdict::Keep;
    }
    let mut removed = removed;
    if bad {
        removed.push("(text git cannot parse)".into());
    }
    let kept: Vec<&Entry> = entries.iter().filter(|e| is_allowed(e)).collect();
    Verdict::Rewrite {
        text: render(&kept),
        removed,
    }
}

/// Parses git configuration text into entries; the flag says whether parsing
/// stopped at an error (entries before it are returned).
pub fn parse(text: &str) -> (Vec<Entry>, bool) {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    let mut section: Option<(String, Option<String>)> = None;
    loop {
        p.skip_blank();
        match p.peek() {
            None => return (out, false),
            Some(b'#' | b';') => p.skip_line(),
            Some(b'[') => match p.header() {
                Some(h) => section = Some(h),
                None => return (out, true),
            },
            Some(c) if c.is_ascii_alphabetic() => {
                let Some((sec, sub)) = section.clone() else {
                    return (out, true);
                };
                match p.variable() {
                    Some((key, value)) => out.push(Entry {
                        section: sec,
                        subsection: sub,
                        key,
                        value,
                    }),
                    None => return (out, true),
                }
            }
            Some(_) => return (out, true),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }
    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn skip_line(&mut self) {
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == b'\n' {
                break;
            }
        }
    }
    /// `[name]`, `[name "sub"]` or the old `[name.sub]`.
    fn header(&mut self) -> Option<(String, Option<String>)> {
        self.i += 1;
        let start = self.i;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        {
            self.i += 1;
        }
        let name = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        if name.is_empty() {
            return None;
        }
        match self.peek()? {
            b']' => {
                self.i += 1;
                // The old form `[a.b]`: section a, subsection b (lower-cased).
                match name.split_once('.') {
                    Some((sec, sub)) if !sec.is_empty() && !sub.is_empty() => {
                        Some((sec.to_ascii_lowercase(), Some(sub.to_ascii_lowercase())))
                    }
                    Some(_) => None,
                    None => Some((name.to_ascii_lowercase(), None)),
                }
            }
            b' ' | b'\t' if !name.contains('.') => {
                self.skip_space();
                if self.peek()? != b'"' {
                    return None;
                }
                self.i += 1;
                let mut sub = Vec::new();
                loop {
                    match self.peek()? {
                        b'"' => break,
                        b'\n' | 0 => return None,
                        b'\\' => {
                            self.i += 1;
                            match self.peek()? {
                                b'\n' | 0 => return None,
                                c => sub.push(c),
                            }
                        }
                        c => sub.push(c),
                    }
                    self.i += 1;
                }
                self.i += 1;
                if self.peek()? != b']' {
                    return None;
                }
                self.i += 1;
                Some((
                    name.to_ascii_lowercase(),
                    Some(String::from_utf8(sub).ok()?),
                ))
            }
            _ => None,
        }
    }
    /// `key`, `key = value` with quotes, escapes, comments and continuations.
    fn variable(&mut self) -> Option<(String, Option<String>)> {
        let start = self.i;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'-') {
            self.i += 1;
        }
        let key = std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .to_ascii_lowercase();
        self.skip_space();
        match self.peek() {
            None => return Some((key, None)),
            Some(b'\n') => {
                self.i += 1;
                return Some((key, None));
            }
            Some(b'\r') if self.s.get(self.i + 1) == Some(&b'\n') => {
                self.i += 2;
                return Some((key, None));
            }
            Some(b'#' | b';') => {
                self.skip_line();
                return Some((key, None));
            }
            Some(b'=') => self.i += 1,
            Some(_) => return None,
        }
        self.skip_space();
        let mut value = Vec::new();
        let mut quoted = false;
        // Trailing unquoted spaces are dropped: remember where they start.
        let mut trim_to = 0;
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'\n' if !quoted => break,
                b'\n' | 0 => return None,
                b'\r' if !quoted && self.peek() == Some(b'\n') => {}
                b'#' | b';' if !quoted => {
                    self.skip_line();
                    break;
                }
                b'"' => {
                    quoted = !quoted;
                    trim_to = value.len();
                }
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    match e {
                        b'\n' => {}
                        b'\r' if self.peek() == Some(b'\n') => self.i += 1,
                        b'n' => value.push(b'\n'),
                        b't' => value.push(b'\t'),
                        b'b' => value.push(0x08),
                        b'\\' | b'"' => value.push(e),
                        _ => return None,
                    }
                    trim_to = value.len();
                }
                b' ' | b'\t' if !quoted => value.push(c),
                _ => {
                    value.push(c);
                    trim_to = value.len();
                }
            }
        }
        if quoted {
            return None;
        }
        value.truncate(trim_to);
        Some((key, Some(String::from_utf8(value).ok()?)))
    }
}

/// Writes entries back in git's syntax, every value quoted and escaped.
fn render(entries: &[&Entry]) -> String {
    let mut out =
        String::from("# Rewritten by moat: keys that could make git run a program were removed.\n");
    let mut current: Option<(&str, Option<&str>)> = None;
    for e in entries {
        let here = (e.section.as_str(), e.subsection.as_deref());
        if current != Some(here) {
            match e.subsection.as_deref() {
                Some(s) => out.push_str(&format!("[{} \"{}\"]\n", e.section, escape(s))),
                None => out.push_str(&format!("[{}]\n", e.section)),
            }
            current = Some(here);
        }
        match &e.value {
            Some(v) => out.push_str(&format!("\t{} = \"{}\"\n", e.key, escape(v))),
            None => out.push_str(&format!("\t{}\n", e.key)),
        }
    }
    out
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\u{8}' => o.push_str("\\b"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<String> {
        match sanitize(text) {
            Verdict::Keep => Vec::new(),
            Verdict::Rewrite { removed, .. } => removed,
        }
    }

    #[test]
    fn a_plain_clone_config_is_kept() {
        let t = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n[remote \"origin\"]\n\turl = https://github.com/acme/widget\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n[branch \"main\"]\n\tremote = origin\n\tmerge = refs/heads/main\n";
        assert_eq!(sanitize(t), Verdict::Keep);
    }

    #[test]
    fn program_running_keys_are_removed_in_every_spelling() {
        for t in [
            "[core]\n\tfsmonitor = touch /tmp/x\n",
            "[Core]\nFSMonitor=x",
            "[core] fsmonitor = x\n",
            "[core]\n\thooksPath = /tmp/h\n",
            "[core]\n\tsshCommand = x\n",
            "[core]\n\tpager = x\n",
            "[core]\n\teditor = x\n",
            "[core]\n\taskPass = x\n",
            "[core]\n\tgitProxy = x\n",
            "[core]\n\talternateRefsCommand = x\n",
            "[core]\n\tworktree = /etc\n",
            "[diff \"x\"]\n\ttextconv = x\n",
            "[diff]\n\texternal = x\n",
            "[merge \"x\"]\n\tdriver = x\n",
            "[filter \"lfs\"]\n\tclean = x\n",
            "[filter \"lfs\"]\n\tprocess = x\n",
            "[credential]\n\thelper = !x\n",
            "[credential \"https://h\"]\n\thelper = x\n",
            "[include]\n\tpath = /tmp/evil\n",
            "[includeIf \"gitdir:/\"]\n\tpath = /tmp/evil\n",
            "[alias]\n\tst = !x\n",
            "[pager]\n\tlog = x\n",
            "[sequence]\n\teditor = x\n",
            "[gpg]\n\tprogram = x\n",
            "[remote \"o\"]\n\tuploadpack = x\n",
            "[remote \"o\"]\n\treceivepack = x\n",
            "[remote \"o\"]\n\turl = ext::sh -c x\n",
            "[submodule \"s\"]\n\tupdate = !x\n",
            "[uploadpack]\n\tpackObjectsHook = x\n",
            "[core.sub]\n\tx = y\n",
        ] {
            let v = sanitize(t);
            let Verdict::Rewrite { text, removed } = v else {
                panic!("kept {t:?}");
            };
            assert!(!removed.is_empty(), "{t:?}");
            let (again, bad) = parse(&text);
            assert!(!bad, "{text}");
            assert!(again.iter().all(is_allowed), "{text}");
        }
    }

    #[test]
    fn continuation_and_quotes_cannot_smuggle_a_key() {
        // A value with an escaped newline is one value, not a second line.
        let t = "[user]\n\tname = \"a\\n\\tfsmonitor = x\"\n[core]\n\tbare = false \\\n\tfsmonitor = y\n";
        let v = sanitize(t);
        let (entries, bad) = parse(t);
        assert!(!bad);
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(v, Verdict::Keep);
    }

    #[test]
    fn unparseable_text_keeps_only_what_came_before() {
        let t = "[core]\n\tbare = false\n[core\n\tfsmonitor = x\n";
        let Verdict::Rewrite { text, removed } = sanitize(t) else {
            panic!()
        };
        assert!(removed.iter().any(|r| r.contains("cannot parse")));
        assert!(text.contains("bare") && !text.contains("fsmonitor"));
    }

    #[test]
    fn rewritten_text_round_trips() {
        let t = "[user]\n\tname = \"we \\\"quote\\\" \\\\ here\"  # c\n[remote \"a b\\\"c\"]\n\turl = x\n[core]\n\tfsmonitor = y\n";
        let Verdict::Rewrite { text, removed } = sanitize(t) else {
            panic!()
        };
        assert_eq!(removed, vec!["core.fsmonitor".to_string()]);
        let (a, _) = parse(t);
        let (b, bad) = parse(&text);
        assert!(!bad);
        let a: Vec<_> = a.into_iter().filter(is_allowed).collect();
        assert_eq!(a, b);
        assert_eq!(names(&text), Vec::<String>::new());
    }
}
