//! `{{hostname}}` in graph strings.
//!
//! One graph may be shared by many hosts (a whole rack in a topology file), so any string value
//! may name the host it runs on. Expansion happens after parsing, value by value, so the
//! locations in error messages still point into the file as written.

/// The one variable a graph may use.
const HOSTNAME: &str = "hostname";

/// Replaces every `{{hostname}}` (spaces inside the braces allowed) with `hostname`.
///
/// Other `{{...}}` text is left as it is: file contents legitimately contain braces, and a
/// template language is not what graphs are for.
pub fn expand(value: &str, hostname: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) if after[..end].trim() == HOSTNAME => {
                out.push_str(hostname);
                rest = &after[end + 2..];
            }
            _ => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn hostname_is_replaced_everywhere_it_appears() {
        assert_eq!(
            expand("@@from-{{hostname}}:/tmp/{{ hostname }}", "h1"),
            "@@from-h1:/tmp/h1"
        );
    }

    #[test]
    fn other_braces_are_left_alone() {
        assert_eq!(expand("{{other}} {{ x", "h1"), "{{other}} {{ x");
        assert_eq!(expand("no template", "h1"), "no template");
    }
}
