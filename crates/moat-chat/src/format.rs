//! Reply formatting for Slack: Markdown (what agents write) to Slack's
//! mrkdwn, and long replies split into messages Slack accepts.
//!
//! [`to_mrkdwn`]: `**bold**` → `*bold*`, `*italic*`/`_italic_` → `_italic_`,
//! `~~strike~~` → `~strike~`, `[text](url)` → `<url|text>`, headings → bold
//! lines, bullets → `•`, code blocks and spans kept (language tags dropped),
//! pipe tables put in a code block so their columns line up. `&`, `<` and `>`
//! are escaped everywhere, code included: Slack decodes the three entities in
//! code too, and an agent's reply can then never carry a live `<!channel>`,
//! `<@U…>` mention or disguised link.
//!
//! [`chunk`]: splits at paragraph, then line, then word boundaries, never
//! inside a code block when the block fits in one message (a longer block is
//! closed and reopened at a line boundary), never inside a character; a word
//! longer than the limit is cut. Lengths are counted in characters.
//!
//! Pure functions: no I/O, no Slack calls.

/// Slack's recommended upper bound for one message's text is 4,000
/// characters; moat splits at 3,900 to leave room.
pub const SLACK_CHUNK: usize = 3900;

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

/// `&`, `<` and `>` as Slack's entities, so text cannot form a mention
/// (`<!channel>`), a link or a user reference.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

/// A fence line (```` ``` ```` or `~~~`, up to 3 spaces indent): its marker.
fn fence_of(line: &str) -> Option<&str> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let t = &line[indent..];
    for ch in ['`', '~'] {
        let n = t.len() - t.trim_start_matches(ch).len();
        if n >= 3 {
            return Some(&t[..n]);
        }
    }
    None
}

fn is_table_row(line: &str) -> bool {
    let t = line.trim();
    t.starts_with('|') && t.len() > 1
}

fn is_table_rule(line: &str) -> bool {
    let t = line.trim();
    t.contains('-') && t.contains('|') && t.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

fn heading(line: &str) -> Option<&str> {
    let t = line.trim_start_matches(' ');
    if line.len() - t.len() > 3 {
        return None;
    }
    let n = t.len() - t.trim_start_matches('#').len();
    if !(1..=6).contains(&n) {
        return None;
    }
    let rest = &t[n..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None;
    }
    let rest = rest.trim();
    // A closing run of #s is not part of the text.
    let stripped = rest.trim_end_matches('#');
    Some(if stripped.is_empty() || stripped.ends_with(' ') {
        stripped.trim_end()
    } else {
        rest
    })
}

fn is_rule(line: &str) -> bool {
    let t: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    t.len() >= 3
        && (t.chars().all(|c| c == '-')
            || t.chars().all(|c| c == '*')
            || t.chars().all(|c| c == '_'))
}

/// Converts Markdown to Slack mrkdwn (see the module's notes).
pub fn to_mrkdwn(markdown: &str) -> String {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut fence: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if let Some(open) = &fence {
            match fence_of(line) {
                Some(f)
                    if f.starts_with(open.as_str())
                        && line
                            .trim_start()
                            .trim_start_matches(|c: char| f.starts_with(c))
                            .trim()
                            .is_empty() =>
                {
                    fence = None;
                    out.push("```".to_string());
                }
                _ => out.push(escape(line)),
            }
            continue;
        }
        if let Some(f) = fence_of(line) {
            fence = Some(f.to_string());
            out.push("```".to_string());
            continue;
        }
        if is_table_row(line) && lines.get(i).is_some_and(|l| is_table_rule(l)) {
            out.push("```".to_string());
            out.push(escape(line.trim()));
            while i < lines.len() && is_table_row(lines[i]) {
                out.push(escape(lines[i].trim()));
                i += 1;
            }
            out.push("```".to_string());
            continue;
        }
        if let Some(h) = heading(line) {
            let text = inline(h, Mode::Heading);
            out.push(if text.trim().is_empty() {
                String::new()
            } else {
                format!("*{text}*")
            });
            continue;
        }
        if is_rule(line) {
            out.push("──────────".to_string());
            continue;
        }
        let indent_len = line.len() - line.trim_start().len();
        let (indent, body) = line.split_at(indent_len);
        if let Some(rest) = body
            .strip_prefix("- ")
            .or_else(|| body.strip_prefix("* "))
            .or_else(|| body.strip_prefix("+ "))
        {
            let (mark, rest) = if let Some(r) = rest.strip_prefix("[ ] ") {
                ("☐ ", r)
            } else if let Some(r) = rest
                .strip_prefix("[x] ")
                .or_else(|| rest.strip_prefix("[X] "))
            {
                ("☑ ", r)
            } else {
                ("• ", rest)
            };
            out.push(format!("{indent}{mark}{}", inline(rest, Mode::Normal)));
            continue;
        }
        let digits = body.len() - body.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if (1..=9).contains(&digits) {
            let after = &body[digits..];
            if let Some(rest) = after
                .strip_prefix(". ")
                .or_else(|| after.strip_prefix(") "))
            {
                out.push(format!(
                    "{indent}{}. {}",
                    &body[..digits],
                    inline(rest, Mode::Normal)
                ));
                continue;
            }
        }
        if let Some(rest) = body.strip_prefix('>') {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            out.push(format!("> {}", inline(rest, Mode::Normal)));
            continue;
        }
        out.push(inline(line, Mode::Normal));
    }
    if fence.is_some() {
        out.push("```".to_string());
    }
    out.join("\n")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// Inside a bold line: bold markers are dropped.
    Heading,
    /// A link's label: all markers dropped.
    Label,
}

fn is_word(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric())
}

/// Byte index of the closing `delim` for an opening at `from` (exclusive),
/// with non-empty content that does not start or end with whitespace.
fn find_close(s: &str, from: usize, delim: &str) -> Option<usize> {
    let content_start = from;
    if s[content_start..].starts_with(char::is_whitespace) {
        return None;
    }
    let single = delim.len() == 1;
    let dch = delim.as_bytes()[0];
    let bytes = s.as_bytes();
    let mut j = content_start;
    while let Some(k) = s[j..].find(delim) {
        let at = j + k;
        // Skip code spans inside the content.
        if let Some(bt) = s[j..at].find('`') {
            let bt = j + bt;
            let run = s[bt..].len() - s[bt..].trim_start_matches('`').len();
            let close = s[bt + run..].find(&s[bt..bt + run]);
            j = match close {
                Some(c) => bt + run + c + run,
                None => bt + run,
            };
            continue;
        }
        let run_end = at + s[at..].len() - s[at..].trim_start_matches(dch as char).len();
        if single && run_end - at > 1 {
            // Part of a longer run (a nested `**`): not our closer.
            j = run_end;
            continue;
        }
        if at > content_start && !s[..at].ends_with(char::is_whitespace) {
            if dch == b'_' && is_word(s[at + delim.len()..].chars().next()) {
                j = at + delim.len();
                continue;
            }
            if bytes[at - 1] != b'\\' {
                return Some(at);
            }
        }
        j = at + delim.len();
    }
    None
}

fn linkable(url: &str) -> bool {
    let l = url.to_ascii_lowercase();
    l.starts_with("https://") || l.starts_with("http://") || l.starts_with("mailto:")
}

/// `<url|label>` with the URL's `|` and spaces percent-encoded.
fn link(out: &mut String, url: &str, label: &str) {
    out.push('<');
    let url = url.replace('|', "%7C").replace(' ', "%20");
    escape_into(out, &url);
    if !label.is_empty() && label != url {
        out.push('|');
        out.push_str(label);
    }
    out.push('>');
}

/// `[label](url "title")` at `i` (on `[`): (label, url, end).
fn parse_link(s: &str, i: usize) -> Option<(&str, &str, usize)> {
    let mut depth = 0;
    let mut close = None;
    for (k, c) in s[i..].char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i + k);
                    break;
                }
            }
            _ => {}
        }
    }
    let close = close?;
    let rest = s[close + 1..].strip_prefix('(')?;
    let open = close + 2;
    let mut depth = 1;
    let mut end = None;
    for (k, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    end = Some(open + k);
                    break;
                }
            }
            _ => {}
        }
    }
    let end = end?;
    let target = s[open..end].trim();
    let url = target
        .split_once(char::is_whitespace)
        .map(|(u, _)| u)
        .unwrap_or(target);
    let url = url
        .strip_prefix('<')
        .and_then(|u| u.strip_suffix('>'))
        .unwrap_or(url);
    Some((&s[i + 1..close], url, end + 1))
}

fn inline(s: &str, mode: Mode) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        let Some(c) = rest.chars().next() else {
            break;
        };
        match c {
            '\\' => {
                let next = rest[1..].chars().next();
                match next {
                    Some(n) if n.is_ascii_punctuation() => {
                        escape_into(&mut out, &n.to_string());
                        i += 1 + n.len_utf8();
                    }
                    _ => {
                        out.push('\\');
                        i += 1;
                    }
                }
            }
            '`' => {
                let run = rest.len() - rest.trim_start_matches('`').len();
                let ticks = &rest[..run];
                match rest[run..].find(ticks) {
                    Some(k) if k > 0 => {
                        let code = &rest[run..run + k];
                        let code = if code.starts_with(' ')
                            && code.ends_with(' ')
                            && !code.trim().is_empty()
                        {
                            &code[1..code.len() - 1]
                        } else {
                            code
                        };
                        if mode == Mode::Label {
                            escape_into(&mut out, code);
                        } else {
                            out.push('`');
                            escape_into(&mut out, code);
                            out.push('`');
                        }
                        i += run + k + run;
                    }
                    _ => {
                        out.push_str(ticks);
                        i += run;
                    }
                }
            }
            '*' | '_' | '~' => {
                let run = rest.len() - rest.trim_start_matches(c).len();
                let prev = s[..i].chars().next_back();
                let (delim, open, close): (&str, &str, &str) = match (c, run) {
                    ('*', n) if n >= 3 => ("***", "*_", "_*"),
                    ('_', n) if n >= 3 => ("___", "*_", "_*"),
                    ('*', 2) => ("**", "*", "*"),
                    ('_', 2) => ("__", "*", "*"),
                    ('*', 1) => ("*", "_", "_"),
                    ('_', 1) => ("_", "_", "_"),
                    ('~', 2) => ("~~", "~", "~"),
                    _ => ("", "", ""),
                };
                let closing = if delim.is_empty() || (c == '_' && is_word(prev)) {
                    None
                } else {
                    find_close(s, i + delim.len(), delim)
                };
                match closing {
                    Some(end) => {
                        let content = inline(&s[i + delim.len()..end], mode);
                        let bold = open.starts_with('*');
                        let (open, close) = match mode {
                            Mode::Label => ("", ""),
                            Mode::Heading if bold && open.len() == 1 => ("", ""),
                            Mode::Heading if bold => ("_", "_"),
                            _ => (open, close),
                        };
                        out.push_str(open);
                        out.push_str(&content);
                        out.push_str(close);
                        i = end + delim.len();
                    }
                    None => {
                        out.push_str(&rest[..run]);
                        i += run;
                    }
                }
            }
            '!' if rest.starts_with("![") => match parse_link(s, i + 1) {
                Some((label, url, end)) if linkable(url) && mode != Mode::Label => {
                    link(&mut out, url, &inline(label, Mode::Label));
                    i = end;
                }
                _ => {
                    out.push('!');
                    i += 1;
                }
            },
            '[' => match parse_link(s, i) {
                Some((label, url, end)) if mode != Mode::Label => {
                    let label = inline(label, Mode::Label);
                    if linkable(url) {
                        link(&mut out, url, &label);
                    } else {
                        out.push_str(&label);
                        if !url.is_empty() {
                            out.push_str(" (");
                            escape_into(&mut out, url);
                            out.push(')');
                        }
                    }
                    i = end;
                }
                _ => {
                    out.push('[');
                    i += 1;
                }
            },
            '<' => {
                // A Markdown autolink: <https://…>.
                let end = rest.find('>');
                match end {
                    Some(e)
                        if linkable(&rest[1..e])
                            && !rest[1..e].contains(char::is_whitespace)
                            && mode != Mode::Label =>
                    {
                        link(&mut out, &rest[1..e], "");
                        i += e + 1;
                    }
                    _ => {
                        out.push_str("&lt;");
                        i += 1;
                    }
                }
            }
            '&' => {
                out.push_str("&amp;");
                i += 1;
            }
            '>' => {
                out.push_str("&gt;");
                i += 1;
            }
            c => {
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// Byte index just after the first `n` chars of `s` (or `s.len()`).
fn byte_after_chars(s: &str, n: usize) -> usize {
    s.char_indices().nth(n).map(|(b, _)| b).unwrap_or(s.len())
}

/// Skips the whitespace a split consumed: all of it up to and including the
/// last line break, or, with no line break, all of it.
fn skip_split_space(s: &str) -> &str {
    let ws = s.len() - s.trim_start().len();
    match s[..ws].rfind('\n') {
        Some(nl) => &s[nl + 1..],
        None => &s[ws..],
    }
}

const OPEN: &str = "```\n";
const CLOSE: &str = "\n```";

/// Splits `text` into pieces of at most `limit` characters (see the
/// module's notes). Whitespace at a split is dropped; nothing else is lost,
/// except that a code block too long for one piece is closed at the end of
/// one and reopened at the start of the next.
pub fn chunk(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    // Re-fencing costs 8 characters; below this it would leave no room.
    let fences = limit >= 24;
    let mut out = Vec::new();
    let mut rest = skip_split_space(text);
    let mut in_code = false; // `rest` continues a code block split earlier
    loop {
        if rest.trim().is_empty() {
            break;
        }
        let prefix = if in_code && fences { OPEN } else { "" };
        let budget = limit - prefix.len();
        let whole = rest.trim_end();
        if whole.chars().count() <= budget {
            out.push(format!("{prefix}{whole}"));
            break;
        }
        let split = pick_split(rest, budget, in_code && fences, fences);
        let piece = rest[..split.at].trim_end();
        out.push(if split.in_code {
            format!("{prefix}{piece}{CLOSE}")
        } else {
            format!("{prefix}{piece}")
        });
        let after = &rest[split.at..];
        rest = if split.in_code {
            // Keep the next code line's indentation.
            after.strip_prefix('\n').unwrap_or(after)
        } else {
            skip_split_space(after)
        };
        in_code = split.in_code;
    }
    out
}

struct Split {
    /// Byte index in `rest` where the piece ends.
    at: usize,
    /// The split is inside a code block (close and reopen it).
    in_code: bool,
}

fn pick_split(rest: &str, budget: usize, starts_in_code: bool, fences: bool) -> Split {
    let win_end = byte_after_chars(rest, budget);
    // Inside code the piece also needs room for the closing fence.
    let code_end = byte_after_chars(rest, budget.saturating_sub(CLOSE.len()));
    let window = &rest[..win_end];
    let quarter = window.len() / 4;

    // Line breaks in the window with the code state after their line.
    struct Nl {
        at: usize,
        in_code: bool,
        para: bool,
    }
    let mut nls: Vec<Nl> = Vec::new();
    let mut in_code = starts_in_code;
    let mut line_start = 0;
    let mut crossing_fence: Option<usize> = None; // start of the block open at the window's end
    let mut prev_blank = false;
    for (k, _) in window.match_indices('\n') {
        let line = &window[line_start..k];
        if fences && fence_of(line).is_some() {
            in_code = !in_code;
            if in_code {
                crossing_fence = Some(line_start);
            }
        }
        let blank = line.trim().is_empty();
        let next_blank = window[k + 1..]
            .split('\n')
            .next()
            .is_some_and(|l| l.trim().is_empty() && k + 1 + l.len() < window.len());
        nls.push(Nl {
            at: k,
            in_code,
            para: blank || prev_blank || next_blank,
        });
        prev_blank = blank;
        line_start = k + 1;
    }
    let content_before = |at: usize| !rest[..at].trim().is_empty();
    let last = |f: &dyn Fn(&Nl) -> bool| {
        nls.iter()
            .rev()
            .find(|n| f(n) && content_before(n.at))
            .map(|n| n.at)
    };

    // The last line may open a block too.
    let tail = &window[line_start..];
    let ends_in_code = if fences && fence_of(tail).is_some() {
        crossing_fence = Some(line_start);
        !in_code
    } else {
        in_code
    };
    if ends_in_code && !starts_in_code {
        if let Some(start) = crossing_fence.filter(|s| *s > 0 && content_before(*s)) {
            // Move the whole block to the next piece if it fits there.
            let block = &rest[start..];
            let first_nl = block.find('\n').map(|n| n + 1).unwrap_or(block.len());
            let close = block[first_nl..]
                .split_inclusive('\n')
                .scan(first_nl, |pos, l| {
                    let p = *pos;
                    *pos += l.len();
                    Some((p, l))
                })
                .find(|(_, l)| fence_of(l.trim_end_matches('\n')).is_some())
                .map(|(p, l)| p + l.trim_end().len());
            if close.is_some_and(|c| block[..c].chars().count() <= budget) {
                return Split {
                    at: start,
                    in_code: false,
                };
            }
        }
    }
    if let Some(at) = last(&|n| n.para && !n.in_code && n.at >= quarter) {
        return Split { at, in_code: false };
    }
    if let Some(at) = last(&|n| !n.in_code && n.at >= quarter) {
        return Split { at, in_code: false };
    }
    if let Some(at) = last(&|n| n.in_code && n.at >= quarter && n.at <= code_end) {
        return Split { at, in_code: true };
    }
    if let Some(at) = last(&|n| !n.in_code) {
        return Split { at, in_code: false };
    }
    // Word boundary, then a hard cut. The code state there is that of its line.
    let state_at = |at: usize| {
        nls.iter()
            .rev()
            .find(|n| n.at < at)
            .map(|n| n.in_code)
            .unwrap_or(starts_in_code)
    };
    let word = window
        .char_indices()
        .rev()
        .filter(|(k, c)| c.is_whitespace() && *k > 0 && content_before(*k))
        .map(|(k, _)| k)
        .find(|k| !state_at(*k) || *k <= code_end);
    if let Some(at) = word {
        return Split {
            at,
            in_code: state_at(at),
        };
    }
    if state_at(win_end) && code_end > 0 {
        return Split {
            at: code_end,
            in_code: true,
        };
    }
    Split {
        at: win_end.max(byte_after_chars(rest, 1)),
        in_code: false,
    }
}

#[cfg(test)]
mod tests;
