//! (being written)
pub fn to_mrkdwn(s: &str) -> String {
    s.to_string()
}
pub fn chunk(s: &str, _l: usize) -> Vec<String> {
    vec![s.to_string()]
}
