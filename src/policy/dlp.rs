//! `[proxy.dlp]`'s decision (pure): what outbound scanning's findings mean for a request
//! to this destination. latchkey's own live secrets are refused whatever `action` says;
//! a rule `allow`ed for the destination does not count; anything else gets `action`.

use super::{Destination, Pattern, Refusal, RefusalKind};

/// What happens to a request holding a secret the policy does not allow there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DlpAction {
    /// Refused with 403 `X-Latchkey-Error: dlp` before it is forwarded.
    #[default]
    Block,
    /// The secret's bytes are masked in place (same length) and the request goes on.
    Redact,
    /// Logged (rule ids and counts) and forwarded unchanged.
    Warn,
}

impl DlpAction {
    pub fn name(self) -> &'static str {
        match self {
            DlpAction::Block => "block",
            DlpAction::Redact => "redact",
            DlpAction::Warn => "warn",
        }
    }
}

/// `[proxy.dlp]` as the decision needs it (the rules themselves are `crate::dlp`'s).
#[derive(Debug, Default)]
pub struct DlpPolicy {
    pub enabled: bool,
    pub action: DlpAction,
    /// `allow`: a rule id and the hosts that kind of secret may go to.
    pub allow: Vec<(String, Vec<Pattern>)>,
}

/// The decision about one request's (or one message's) findings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlpVerdict {
    /// Nothing found, or only what may go to this destination.
    Forward,
    Block(Refusal),
    Redact,
    Warn,
}

impl DlpPolicy {
    /// May a secret found by `rule` go to `dest`?
    pub fn allowed(&self, rule: &str, dest: &Destination) -> bool {
        self.allow.iter().any(|(r, hosts)| {
            r == rule
                && hosts.iter().any(|p| {
                    p.matches_host(&dest.host).is_some() && p.port.is_none_or(|port| port == dest.port)
                })
        })
    }

    /// `own`: how many of latchkey's own secrets were found; `rules`: the ids of the
    /// rule matches that are not allowed to `dest` (repeats allowed), in order found.
    pub fn verdict(&self, dest: &Destination, own: usize, rules: &[&str]) -> DlpVerdict {
        if own > 0 {
            return DlpVerdict::Block(Refusal::new(
                RefusalKind::Dlp,
                format!(
                    "the request carries a live secret of one of latchkey's credentials ({own}× latchkey-secret); it is never sent to {} or anywhere else",
                    dest.host
                ),
            ));
        }
        if rules.is_empty() {
            return DlpVerdict::Forward;
        }
        match self.action {
            DlpAction::Block => DlpVerdict::Block(Refusal::new(
                RefusalKind::Dlp,
                format!(
                    "the request carries a secret ({}) that [proxy.dlp] does not let go to {}; remove it, or allow that rule for this host",
                    counted(rules),
                    dest.host
                ),
            )),
            DlpAction::Redact => DlpVerdict::Redact,
            DlpAction::Warn => DlpVerdict::Warn,
        }
    }
}

/// `aws-access-key, 2× github-pat`: rule ids with their counts, in order found.
pub fn counted(rules: &[&str]) -> String {
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for r in rules {
        match seen.iter_mut().find(|(id, _)| id == r) {
            Some((_, n)) => *n += 1,
            None => seen.push((r, 1)),
        }
    }
    let parts: Vec<String> =
        seen.iter().map(|(id, n)| if *n == 1 { id.to_string() } else { format!("{n}× {id}") }).collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str) -> Destination {
        Destination::parse_authority(&format!("{host}:443"), None).unwrap()
    }

    fn policy(action: DlpAction) -> DlpPolicy {
        let hosts = vec![Pattern::parse("api.github.com").unwrap()];
        DlpPolicy { enabled: true, action, allow: vec![("github-pat".into(), hosts)] }
    }

    #[test]
    fn own_secrets_are_refused_whatever_the_action() {
        for action in [DlpAction::Block, DlpAction::Redact, DlpAction::Warn] {
            let v = policy(action).verdict(&dest("example.com"), 1, &[]);
            assert!(matches!(v, DlpVerdict::Block(r) if r.kind == RefusalKind::Dlp), "{action:?}");
        }
    }

    #[test]
    fn allow_names_rule_and_host() {
        let p = policy(DlpAction::Block);
        assert!(p.allowed("github-pat", &dest("api.github.com")));
        assert!(!p.allowed("github-pat", &dest("evil-api.github.com.example")));
        assert!(!p.allowed("aws-access-key", &dest("api.github.com")));
        let v = p.verdict(&dest("example.com"), 0, &["jwt", "jwt", "github-pat"]);
        let DlpVerdict::Block(r) = v else { panic!() };
        assert!(r.message.contains("2× jwt, github-pat"), "{}", r.message);
        assert_eq!(policy(DlpAction::Warn).verdict(&dest("x.com"), 0, &["jwt"]), DlpVerdict::Warn);
        assert_eq!(policy(DlpAction::Redact).verdict(&dest("x.com"), 0, &[]), DlpVerdict::Forward);
    }
}
