//! Names of the files an agent leaves in `~/artifacts` (any bytes a
//! sandbox can put in a file name): whether one may be sent, how it is
//! shown in chat, and the download header the web chat gives it.
//!
//! Beyond "no panic": an accepted name is one plain entry (no `/`, NUL,
//! `.` or `..`), valid UTF-8, short, without control or direction-changing
//! characters; the shown form has no control, invisible or backtick
//! character, is bounded, and is the name itself when the name was accepted; the `Content-Disposition` value is a valid
//! header whose fallback cannot name a path and whose UTF-8 form decodes
//! back to the exact name.

#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;
use moat_gateway::artifacts::{name_accepted_for_fuzzing, shown_name};
use moat_gateway::web::attachment_for_fuzzing;

fuzz_target!(|data: &[u8]| {
    let name = OsStr::from_bytes(data);
    if name_accepted_for_fuzzing(name) {
        let s = std::str::from_utf8(data).expect("an accepted name is UTF-8");
        assert!(!s.is_empty() && s.len() <= 200);
        assert!(!s.contains(['/', '\0']) && s != "." && s != "..");
        assert!(!s.chars().any(|c| c.is_control() || invisible(c)));
        // A sent file's name is shown as it is, bar backticks.
        assert_eq!(
            shown_name(name).replace('\'', "`"),
            s.replace('\'', "`").chars().take(100).collect::<String>()
                + if s.chars().count() > 100 { "…" } else { "" }
        );
    }

    let shown = shown_name(name);
    // At most 100 characters of the name, each escaped to at most 10
    // (`\u{10ffff}`), and the ellipsis.
    assert!(shown.chars().count() <= 100 * 10 + 1);
    assert!(!shown.contains('`'));
    assert!(
        !shown.chars().any(|c| c.is_control() || invisible(c)),
        "{shown:?}"
    );

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let value = attachment_for_fuzzing(s);
    assert!(http::HeaderValue::from_str(&value).is_ok(), "{value:?}");
    let rest = value
        .strip_prefix("attachment; filename=\"")
        .expect("attachment form");
    let (fallback, rest) = rest.split_once("\"; filename*=UTF-8''").expect("two forms");
    assert!(fallback
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b' ')));
    assert!(!fallback.contains(['/', '\\', '"']));
    assert_eq!(percent_decode(rest).as_deref(), Some(data));
});

fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else if b[i].is_ascii_alphanumeric() || matches!(b[i], b'.' | b'-' | b'_') {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}
