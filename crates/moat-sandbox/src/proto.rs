//! The wire protocol between the host and `moat-init`, the first process inside a
//! bwrap sandbox. One SOCK_SEQPACKET datagram per message.
//!
//! Host -> init: `R` run request, carrying stdin, stdout, stderr as SCM_RIGHTS.
//! Init -> host: `H` hello once, then per request `S` started, and `X` exited,
//! `K` killed by signal or `E` could not exec.
//!
//! The host treats everything init says as untrusted input: init runs inside the
//! sandbox and may be replaced by the agent. Decoding never panics.

/// Largest request: argv + env + cwd. Bigger requests are refused before sending.
pub const MAX_REQUEST: usize = 256 * 1024;

/// fd number of the control socket inside the sandbox.
pub const CONTROL_FD: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Hello,
    Started(i32),
    Exited(i32),
    Signaled(i32),
    ExecFailed(i32),
}

impl RunRequest {
    /// Encodes the request; `None` if a string holds a NUL or the whole is too big.
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        out.push(b'R');
        out.extend_from_slice(&(self.argv.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.env.len() as u32).to_le_bytes());
        for s in self
            .argv
            .iter()
            .chain(self.env.iter())
            .chain(std::iter::once(&self.cwd))
        {
            if s.contains(&0) {
                return None;
            }
            out.extend_from_slice(s);
            out.push(0);
        }
        (out.len() <= MAX_REQUEST).then_some(out)
    }

    pub fn decode(buf: &[u8]) -> Option<RunRequest> {
        if buf.len() < 9 || buf[0] != b'R' {
            return None;
        }
        let argc = u32::from_le_bytes(buf[1..5].try_into().ok()?) as usize;
        let envc = u32::from_le_bytes(buf[5..9].try_into().ok()?) as usize;
        let mut parts = buf[9..].split(|&b| b == 0);
        let mut take = |n: usize| -> Option<Vec<Vec<u8>>> {
            (0..n).map(|_| parts.next().map(|s| s.to_vec())).collect()
        };
        let argv = take(argc.min(MAX_REQUEST))?;
        let env = take(envc.min(MAX_REQUEST))?;
        let cwd = take(1)?.pop()?;
        if argv.is_empty() || argv.len() != argc || env.len() != envc {
            return None;
        }
        Some(RunRequest { argv, env, cwd })
    }
}

impl Reply {
    pub fn encode(self) -> [u8; 5] {
        let (tag, v) = match self {
            Reply::Hello => (b'H', 0),
            Reply::Started(p) => (b'S', p),
            Reply::Exited(c) => (b'X', c),
            Reply::Signaled(s) => (b'K', s),
            Reply::ExecFailed(e) => (b'E', e),
        };
        let mut out = [tag, 0, 0, 0, 0];
        out[1..].copy_from_slice(&v.to_le_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Option<Reply> {
        if buf.len() != 5 {
            return None;
        }
        let v = i32::from_le_bytes(buf[1..5].try_into().ok()?);
        match buf[0] {
            b'H' => Some(Reply::Hello),
            b'S' if v > 0 => Some(Reply::Started(v)),
            b'X' if (0..=255).contains(&v) => Some(Reply::Exited(v)),
            b'K' if (1..=64).contains(&v) => Some(Reply::Signaled(v)),
            b'E' if v > 0 => Some(Reply::ExecFailed(v)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = RunRequest {
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
            env: vec![b"A=1".to_vec()],
            cwd: b"/workspace".to_vec(),
        };
        assert_eq!(RunRequest::decode(&r.encode().unwrap()), Some(r));
    }

    #[test]
    fn bad_requests_are_refused() {
        let r = RunRequest {
            argv: vec![b"a\0b".to_vec()],
            env: vec![],
            cwd: b"/".to_vec(),
        };
        assert!(r.encode().is_none());
        assert!(RunRequest::decode(b"").is_none());
        assert!(RunRequest::decode(b"R\xff\xff\xff\xff\0\0\0\0").is_none());
        assert!(
            RunRequest::decode(b"R\x00\x00\x00\x00\0\0\0\0/\0").is_none(),
            "empty argv"
        );
    }

    #[test]
    fn replies_are_checked() {
        for r in [
            Reply::Hello,
            Reply::Started(7),
            Reply::Exited(3),
            Reply::Signaled(9),
            Reply::ExecFailed(2),
        ] {
            assert_eq!(Reply::decode(&r.encode()), Some(r));
        }
        assert_eq!(Reply::decode(&Reply::Exited(300).encode()), None);
        assert_eq!(Reply::decode(&Reply::Signaled(0).encode()), None);
        assert_eq!(Reply::decode(b"X"), None);
        assert_eq!(Reply::decode(b"Z\0\0\0\0"), None);
    }
}
