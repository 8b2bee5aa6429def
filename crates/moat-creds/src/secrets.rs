//! The secrets file: the host's real keys (LLM API keys, the GitHub App's
//! id, private key and installation id) in a `KEY=VALUE` file, as an
//! alternative to moat's environment, and [`Lookup`], which reads moat's
//! environment first and the file second.
//!
//! Must never: read a file that others could read or change (a symbolic link,
//! something that is not a regular file, a group- or world-accessible file, a
//! file owned by another user), or show a value in an error, a log or a
//! `Debug` print. Values are held as [`Secret`] from the moment they are read.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::Secret;

/// The variable naming the secrets file when `--secrets` is not given.
pub const SECRETS_FILE_VAR: &str = "MOAT_SECRETS_FILE";
/// Largest secrets file read.
const MAX_FILE: u64 = 1024 * 1024;

/// Why a secrets file was refused. The message names the file and what to
/// do; it never carries a value (nor the text of a bad line).
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets file {path}: cannot read it: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("secrets file {path}: is a symbolic link; name the file itself")]
    Symlink { path: PathBuf },
    #[error("secrets file {path}: is a {kind}, not a regular file; name a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "secrets file {path}: can be read or written by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "secrets file {path}: is owned by uid {owner}, not by root or by moat's user (uid {euid}); run `chown {euid} {path}`"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("secrets file {path}: is larger than {MAX_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("secrets file {path}, line {line}: {what}; write KEY=VALUE")]
    Syntax {
        path: PathBuf,
        line: usize,
        what: &'static str,
    },
    #[error(
        "secrets file {path}, line {line}: {key} is already set on line {first}; keep one of them"
    )]
    Duplicate {
        path: PathBuf,
        key: String,
        line: usize,
        first: usize,
    },
}

/// A loaded secrets file: its keys and their values, held as [`Secret`].
pub struct SecretsFile {
    path: PathBuf,
    values: BTreeMap<String, Secret>,
}

impl fmt::Debug for SecretsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsFile")
            .field("path", &self.path)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "named pipe"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

fn valid_key(k: &str) -> bool {
    let mut b = k.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

impl SecretsFile {
    /// Reads and checks `path` (see the module's rules).
    pub fn load(path: &Path) -> Result<SecretsFile, SecretsError> {
        let p = || path.to_path_buf();
        let unreadable = |e: std::io::Error| SecretsError::Unreadable {
            path: p(),
            reason: e.to_string(),
        };
        let meta = std::fs::symlink_metadata(path).map_err(unreadable)?;
        if meta.file_type().is_symlink() {
            return Err(SecretsError::Symlink { path: p() });
        }
        if !meta.file_type().is_file() {
            return Err(SecretsError::NotRegular {
                path: p(),
                kind: kind_of(&meta.file_type()),
            });
        }
        // Open without following a link and without blocking on a pipe
        // swapped in since, then check what was opened.
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    SecretsError::Symlink { path: p() }
                } else {
                    unreadable(e)
                }
            })?;
        let meta = file.metadata().map_err(unreadable)?;
        if !meta.file_type().is_file() {
            return Err(SecretsError::NotRegular {
                path: p(),
                kind: kind_of(&meta.file_type()),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Permissions { path: p(), mode });
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != euid {
            return Err(SecretsError::Owner {
                path: p(),
                owner: meta.uid(),
                euid,
            });
        }
        if meta.len() > MAX_FILE {
            return Err(SecretsError::TooLarge { path: p() });
        }
        let mut bytes = Vec::new();
        file.by_ref()
            .take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(unreadable)?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(SecretsError::TooLarge { path: p() });
        }
        Self::parse(path, &bytes)
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<SecretsFile, SecretsError> {
        let syntax = |line: usize, what: &'static str| SecretsError::Syntax {
            path: path.to_path_buf(),
            line,
            what,
        };
        let mut values = BTreeMap::new();
        let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = std::str::from_utf8(raw).map_err(|_| syntax(n, "not UTF-8 text"))?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(syntax(n, "no `=`"));
            };
            let key = key.trim_end();
            if !valid_key(key) {
                return Err(syntax(
                    n,
                    "the key is not a name (letters, digits and _, not starting with a digit)",
                ));
            }
            let value = value.trim_start();
            let value = match value.as_bytes().first() {
                Some(&q @ (b'"' | b'\'')) => {
                    if value.len() < 2 || value.as_bytes()[value.len() - 1] != q {
                        return Err(syntax(n, "a quoted value does not end with its quote"));
                    }
                    &value[1..value.len() - 1]
                }
                _ => value,
            };
            if let Some(&first) = first_line.get(key) {
                return Err(SecretsError::Duplicate {
                    path: path.to_path_buf(),
                    key: key.to_string(),
                    line: n,
                    first,
                });
            }
            first_line.insert(key.to_string(), n);
            values.insert(key.to_string(), Secret::new(value));
        }
        Ok(SecretsFile {
            path: path.to_path_buf(),
            values,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value of `key`, if the file sets it.
    pub fn get(&self, key: &str) -> Option<&Secret> {
        self.values.get(key)
    }

    /// The keys the file sets (never the values).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

type EnvFn = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where moat finds a host secret or setting: moat's environment first (a
/// variable set but empty counts as unset), then the secrets file, if any.
/// `lookup.get(key)` fits `LlmConfig::from_env` and
/// `GithubConfig::from_lookup`: `|k| lookup.get(k)`.
pub struct Lookup {
    env: EnvFn,
    file: Option<SecretsFile>,
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lookup").field("file", &self.file).finish()
    }
}

impl Lookup {
    /// moat's own environment, then `file`.
    pub fn new(file: Option<SecretsFile>) -> Lookup {
        Lookup::with_env(|k| std::env::var(k).ok(), file)
    }

    /// `env` (instead of moat's environment), then `file`.
    pub fn with_env(
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
        file: Option<SecretsFile>,
    ) -> Lookup {
        Lookup {
            env: Box::new(env),
            file,
        }
    }

    /// The CLI's lookup: the file named by `flag` (`--secrets FILE`), else by
    /// `MOAT_SECRETS_FILE` in moat's environment, else none.
    pub fn from_flag_or_env(flag: Option<&Path>) -> Result<Lookup, SecretsError> {
        let path = flag.map(Path::to_path_buf).or_else(|| {
            std::env::var_os(SECRETS_FILE_VAR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let file = path.as_deref().map(SecretsFile::load).transpose()?;
        Ok(Lookup::new(file))
    }

    /// The value of `key`: moat's environment first, then the file.
    pub fn get(&self, key: &str) -> Option<String> {
        (self.env)(key)
            .filter(|v| !v.is_empty())
            .or_else(|| self.get_secret(key).map(|s| s.expose().to_string()))
    }

    fn get_secret(&self, key: &str) -> Option<&Secret> {
        self.file.as_ref().and_then(|f| f.get(key))
    }

    /// The secrets file in use, if any.
    pub fn file(&self) -> Option<&SecretsFile> {
        self.file.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    const KEY: &str = "sk-ant-REALVALUE-0123456789";

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn err(dir: &Path, text: &str) -> String {
        let p = write(dir, "bad", text, 0o600);
        let e = SecretsFile::load(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        e
    }

    #[test]
    fn reads_keys_values_comments_and_quotes() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "# the real keys\n\nANTHROPIC_API_KEY={KEY}\n  OPENAI_API_KEY = \"sk-openai\"  \r\n\
             GITHUB_APP_PRIVATE_KEY='-----BEGIN KEY-----\\nabc\\n-----END KEY-----\\n'\n\
             EMPTY=\nWITH_EQ=a=b#c\nGITHUB_APP_ID=123"
        );
        let f = SecretsFile::load(&write(d.path(), "s", &text, 0o600)).unwrap();
        assert_eq!(f.get("ANTHROPIC_API_KEY").unwrap().expose(), KEY);
        assert_eq!(f.get("OPENAI_API_KEY").unwrap().expose(), "sk-openai");
        assert_eq!(
            f.get("GITHUB_APP_PRIVATE_KEY").unwrap().expose(),
            "-----BEGIN KEY-----\\nabc\\n-----END KEY-----\\n",
            "a literal \\n stays two characters"
        );
        assert_eq!(f.get("EMPTY").unwrap().expose(), "");
        assert_eq!(f.get("WITH_EQ").unwrap().expose(), "a=b#c");
        assert_eq!(f.get("GITHUB_APP_ID").unwrap().expose(), "123");
        assert!(f.get("# the real keys").is_none());
        assert_eq!(f.keys().count(), 6);
        // Neither Debug of the file nor of the lookup shows a value.
        let dbg = format!("{f:?}");
        let dbg = format!("{dbg} {:?}", Lookup::new(Some(f)));
        assert!(dbg.contains("ANTHROPIC_API_KEY"), "{dbg}");
        assert!(!dbg.contains(KEY) && !dbg.contains("sk-openai"), "{dbg}");
    }

    #[test]
    fn bad_lines_name_the_line_never_the_value() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (format!("# ok\nANTHROPIC_API_KEY{KEY}\n"), 2, "no `=`"),
            (format!("A=1\n\n{KEY}=x\n"), 3, "not a name"),
            (format!("1KEY={KEY}\n"), 1, "not a name"),
            (format!("K=\"{KEY}\n"), 1, "does not end with its quote"),
            (format!("K='{KEY}\"\n"), 1, "does not end with its quote"),
            ("K=\"\n".to_string(), 1, "does not end with its quote"),
        ];
        for (text, line, what) in cases {
            let e = err(d.path(), &text);
            assert!(e.contains(&format!("line {line}:")), "{e}");
            assert!(e.contains(what), "{e}");
            assert!(e.contains("KEY=VALUE"), "says what to write: {e}");
            assert!(!e.contains(KEY) && !e.contains("sk-ant"), "{e}");
        }
        let mut bytes = b"A=1\nB=\xff\xfe\n".to_vec();
        bytes.extend_from_slice(KEY.as_bytes());
        let p = d.path().join("binary");
        std::fs::write(&p, &bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SecretsFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 2:") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn a_duplicate_key_is_refused_naming_both_lines() {
        let d = tempfile::tempdir().unwrap();
        let e = err(
            d.path(),
            &format!("OPENAI_API_KEY=sk-first-value\n# again\nOPENAI_API_KEY={KEY}\n"),
        );
        assert!(
            e.contains("line 3: OPENAI_API_KEY is already set on line 1"),
            "{e}"
        );
        assert!(!e.contains(KEY) && !e.contains("sk-first-value"), "{e}");
    }

    #[test]
    fn group_or_world_access_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o620, 0o602, 0o644, 0o666] {
            let p = write(d.path(), "s", &format!("K={KEY}\n"), mode);
            let e = SecretsFile::load(&p).unwrap_err();
            assert!(matches!(e, SecretsError::Permissions { .. }), "{mode:o}");
            let e = e.to_string();
            assert!(
                e.contains(&format!("chmod 600 {}", p.display())),
                "{mode:o}: {e}"
            );
            assert!(!e.contains(KEY), "{e}");
        }
        for mode in [0o600, 0o400] {
            let p = write(d.path(), "s", &format!("K={KEY}\n"), mode);
            assert!(SecretsFile::load(&p).is_ok(), "{mode:o}");
        }
    }

    #[test]
    fn symlinks_directories_and_pipes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = write(d.path(), "real", &format!("K={KEY}\n"), 0o600);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = SecretsFile::load(&link).unwrap_err();
        assert!(matches!(e, SecretsError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");

        let e = SecretsFile::load(d.path()).unwrap_err();
        assert!(
            matches!(
                e,
                SecretsError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );

        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = SecretsFile::load(&fifo).unwrap_err();
        assert!(
            matches!(
                e,
                SecretsError::NotRegular {
                    kind: "named pipe",
                    ..
                }
            ),
            "{e}"
        );

        let e = SecretsFile::load(&d.path().join("missing")).unwrap_err();
        assert!(matches!(e, SecretsError::Unreadable { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn a_file_owned_by_another_user_is_refused() {
        let euid = nix::unistd::geteuid().as_raw();
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "s", &format!("K={KEY}\n"), 0o600);
        if euid != 0 {
            // Not root: a file we own passes; chown to another user is not
            // possible, so only the accepted side is checked here.
            assert!(SecretsFile::load(&p).is_ok());
            return;
        }
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = SecretsFile::load(&p).unwrap_err();
        assert!(matches!(e, SecretsError::Owner { owner: 65534, .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("uid 65534") && e.contains("chown 0"), "{e}");
        assert!(!e.contains(KEY), "{e}");
        std::os::unix::fs::chown(&p, Some(0), None).unwrap();
        assert!(SecretsFile::load(&p).is_ok());
    }

    #[test]
    fn the_environment_comes_first_then_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "s",
            "ANTHROPIC_API_KEY=from-file\nOPENAI_API_KEY=file-openai\nONLY_FILE=f\n",
            0o600,
        );
        let file = SecretsFile::load(&p).unwrap();
        let l = Lookup::with_env(
            |k| match k {
                "ANTHROPIC_API_KEY" => Some("from-env".into()),
                "OPENAI_API_KEY" => Some(String::new()),
                "ONLY_ENV" => Some("e".into()),
                _ => None,
            },
            Some(file),
        );
        assert_eq!(l.get("ANTHROPIC_API_KEY").as_deref(), Some("from-env"));
        assert_eq!(
            l.get("OPENAI_API_KEY").as_deref(),
            Some("file-openai"),
            "an empty variable counts as unset"
        );
        assert_eq!(l.get("ONLY_FILE").as_deref(), Some("f"));
        assert_eq!(l.get("ONLY_ENV").as_deref(), Some("e"));
        assert_eq!(l.get("NEITHER"), None);
        assert_eq!(l.file().unwrap().path(), p.as_path());
        let none = Lookup::with_env(|_| None, None);
        assert_eq!(none.get("ANTHROPIC_API_KEY"), None);
    }

    #[test]
    fn the_lookup_feeds_the_github_config() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "s",
            "GITHUB_APP_ID=42\nGITHUB_APP_INSTALLATION_ID=7\n\
             GITHUB_APP_PRIVATE_KEY=\"-----BEGIN RSA PRIVATE KEY-----\\nAAA\\n-----END RSA PRIVATE KEY-----\"\n",
            0o600,
        );
        let l = Lookup::with_env(|_| None, Some(SecretsFile::load(&p).unwrap()));
        let cfg = crate::GithubConfig::from_lookup(|k| l.get(k)).unwrap();
        assert_eq!(
            (cfg.app_id.as_str(), cfg.installation_id.as_str()),
            ("42", "7")
        );
        assert_eq!(
            cfg.private_key.expose(),
            "-----BEGIN RSA PRIVATE KEY-----\nAAA\n-----END RSA PRIVATE KEY-----",
            "the literal \\n of the file becomes a newline in the GitHub config"
        );
        let dbg = format!("{cfg:?}");
        assert!(dbg.contains("42") && !dbg.contains("AAA"), "{dbg}");
    }
}
