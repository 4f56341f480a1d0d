//! The egress policy of a slot, validated and bounded, and how it maps onto the
//! dataplane's maps.
//!
//! Model: a default action; CIDR rules (allow or deny, the longest matching
//! prefix wins); domain rules (allow or deny, exact names or `*.suffix`
//! wildcards) enforced by the slot's resolver; rate limits per direction; port
//! exposures. Precedence for an address: an explicit CIDR deny beats an address
//! learnt from an allowed domain (so DNS cannot open a denied range: rebinding),
//! which beats a CIDR allow, which beats the default. Inbound packets are
//! admitted to exposed ports, and from addresses the guest may reach.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Bounds on a policy (the maps are sized for them).
pub const MAX_CIDR_RULES: usize = 256;
/// Domain rules.
pub const MAX_DOMAIN_RULES: usize = 256;
/// Exposed ports.
pub const MAX_EXPOSURES: usize = 32;
/// Rate limit, bytes per second (80 Gbit/s; the program's arithmetic needs a bound).
pub const MAX_RATE_BPS: u64 = 10_000_000_000;
/// Smallest burst: one full frame must fit.
pub const MIN_BURST: u64 = 1514;

/// Rule ids of CIDR rules start here (index + base).
pub const CIDR_RULE_BASE: u32 = 1;
/// Rule ids of domain rules start here (index + base).
pub const DOMAIN_RULE_BASE: u32 = 0x1_0000;
/// Rule id of the built-in rule that keeps slots apart (the pool's address range).
pub const RULE_ISOLATION: u32 = 0xffff_fff1;

/// Errors of policy validation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("too many {what}: {n} (at most {max})")]
    TooMany { what: &'static str, n: usize, max: usize },
    #[error("CIDR {0:?} is invalid (want a.b.c.d/len, len <= 32)")]
    BadCidr(String),
    #[error("domain pattern {0:?} is invalid (labels of [a-z0-9-_], 1-63 chars, <= 253 in all; `*.` only first)")]
    BadDomain(String),
    #[error("rate limit {0} bytes/s is out of range (1..={MAX_RATE_BPS})")]
    BadRate(u64),
    #[error("burst {burst} bytes is out of range ({MIN_BURST}..=1 GiB)")]
    BadBurst { burst: u64 },
    #[error("port exposure {0}: ports must be non-zero and each slot port exposed once")]
    BadExposure(String),
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/len` (or a bare address, /32); host bits are cleared.
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadCidr(s.to_string());
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        Ok(Self { addr: Self::mask(addr, len), len })
    }

    fn mask(a: Ipv4Addr, len: u8) -> Ipv4Addr {
        let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
        Ipv4Addr::from(u32::from(a) & m)
    }

    /// Whether `a` is inside.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        Self::mask(a, self.len) == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A CIDR rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidrRule {
    pub cidr: Cidr,
    pub action: Action,
}

/// A domain pattern: `example.com` (that name only) or `*.example.com` (any name
/// below it, not the name itself). Stored lower-case without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainPattern {
    suffix: String,
    wildcard: bool,
}

impl TryFrom<String> for DomainPattern {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        Self::parse(&s)
    }
}

impl From<DomainPattern> for String {
    fn from(p: DomainPattern) -> String {
        p.to_string()
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.suffix)
        } else {
            f.write_str(&self.suffix)
        }
    }
}

/// Whether `name` (lower-case, no trailing dot) is a valid DNS name of
/// letters, digits, `-` and `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl DomainPattern {
    /// Parses a pattern (case-insensitive, trailing dot allowed).
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, suffix) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower),
        };
        if !valid_name(&suffix) {
            return Err(PolicyError::BadDomain(s.to_string()));
        }
        Ok(Self { suffix, wildcard })
    }

    /// Whether `name` (lower-case, no trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        if self.wildcard {
            name.len() > self.suffix.len() + 1
                && name.ends_with(&self.suffix)
                && name.as_bytes()[name.len() - self.suffix.len() - 1] == b'.'
        } else {
            name == self.suffix
        }
    }
}

/// A domain rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRule {
    pub pattern: DomainPattern,
    pub action: Action,
}

/// A token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// `slot address:slot_port` reaches `guest:guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposure {
    pub proto: Proto,
    pub slot_port: u16,
    pub guest_port: u16,
}

/// A slot's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub default: Action,
    #[serde(default)]
    pub cidrs: Vec<CidrRule>,
    #[serde(default)]
    pub domains: Vec<DomainRule>,
    #[serde(default)]
    pub egress_rate: Option<RateLimit>,
    #[serde(default)]
    pub ingress_rate: Option<RateLimit>,
    #[serde(default)]
    pub expose: Vec<Exposure>,
}

/// What a denial's rule id refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleRef {
    /// The default action.
    Default,
    /// `cidrs[i]`.
    Cidr(usize),
    /// `domains[i]`.
    Domain(usize),
    /// DNS to a server other than the slot's resolver.
    Dns,
    /// The built-in isolation of slots from each other.
    Isolation,
    /// An id this policy does not know (changed since).
    Unknown(u32),
}

impl RuleRef {
    /// Decodes a rule id from the maps.
    pub fn from_id(id: u32) -> Self {
        match id {
            crate::dataplane::maps::RULE_DEFAULT => Self::Default,
            crate::dataplane::maps::RULE_DNS => Self::Dns,
            RULE_ISOLATION => Self::Isolation,
            i if (CIDR_RULE_BASE..DOMAIN_RULE_BASE).contains(&i) => {
                Self::Cidr((i - CIDR_RULE_BASE) as usize)
            }
            i if (DOMAIN_RULE_BASE..DOMAIN_RULE_BASE + 0x1_0000).contains(&i) => {
                Self::Domain((i - DOMAIN_RULE_BASE) as usize)
            }
            i => Self::Unknown(i),
        }
    }
}

/// The resolver's decision for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict {
    /// Allowed by `domains[i]`: resolve, and allow the answers' addresses.
    AllowedBy(usize),
    /// Denied by `domains[i]`: answer NXDOMAIN, ask no one.
    DeniedBy(usize),
    /// No rule: resolve when the default allows, refuse otherwise.
    Default(Action),
}

impl Policy {
    /// Checks the bounds and the values.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bound = |what, n: usize, max| {
            if n > max {
                Err(PolicyError::TooMany { what, n, max })
            } else {
                Ok(())
            }
        };
        bound("CIDR rules", self.cidrs.len(), MAX_CIDR_RULES)?;
        bound("domain rules", self.domains.len(), MAX_DOMAIN_RULES)?;
        bound("port exposures", self.expose.len(), MAX_EXPOSURES)?;
        for r in &self.cidrs {
            if r.cidr.len > 32 || Cidr::mask(r.cidr.addr, r.cidr.len) != r.cidr.addr {
                return Err(PolicyError::BadCidr(r.cidr.to_string()));
            }
        }
        for rl in [self.egress_rate, self.ingress_rate].into_iter().flatten() {
            if rl.bytes_per_sec == 0 || rl.bytes_per_sec > MAX_RATE_BPS {
                return Err(PolicyError::BadRate(rl.bytes_per_sec));
            }
            if !(MIN_BURST..=1 << 30).contains(&rl.burst_bytes) {
                return Err(PolicyError::BadBurst { burst: rl.burst_bytes });
            }
        }
        for (i, e) in self.expose.iter().enumerate() {
            let dup = self.expose[..i].iter().any(|o| {
                o.proto == e.proto && (o.slot_port == e.slot_port || o.guest_port == e.guest_port)
            });
            if e.slot_port == 0 || e.guest_port == 0 || dup {
                return Err(PolicyError::BadExposure(format!(
                    "{:?} {}->{}",
                    e.proto, e.slot_port, e.guest_port
                )));
            }
        }
        Ok(())
    }

    /// The resolver's decision for `name` (lower-case, no trailing dot): the first
    /// matching deny rule, else the first matching allow rule, else the default.
    pub fn name_verdict(&self, name: &str) -> NameVerdict {
        let find =
            |a: Action| self.domains.iter().position(|r| r.action == a && r.pattern.matches(name));
        if let Some(i) = find(Action::Deny) {
            NameVerdict::DeniedBy(i)
        } else if let Some(i) = find(Action::Allow) {
            NameVerdict::AllowedBy(i)
        } else {
            NameVerdict::Default(self.default)
        }
    }

    /// Whether an explicit CIDR deny (the longest matching prefix) covers `a`,
    /// or `a` is in `isolated`: a learnt address there is not allowed.
    pub fn cidr_denies(&self, a: Ipv4Addr, isolated: Option<Cidr>) -> bool {
        if isolated.is_some_and(|c| c.contains(a)) {
            return true;
        }
        self.cidrs
            .iter()
            .filter(|r| r.cidr.contains(a))
            .max_by_key(|r| r.cidr.len)
            .is_some_and(|r| r.action == Action::Deny)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_mask() {
        let c = Cidr::parse("10.1.2.3/16").unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.200.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().len, 32);
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["1.2.3.4/33", "1.2.3/8", "x", "1.2.3.4/"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domain_patterns_match_exactly_or_below() {
        let exact = DomainPattern::parse("Example.COM.").unwrap();
        let wild = DomainPattern::parse("*.example.com").unwrap();
        assert!(exact.matches("example.com") && !exact.matches("a.example.com"));
        assert!(wild.matches("a.example.com") && wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com") && !wild.matches("badexample.com"));
        for bad in ["", "*", "a..b", "*.*.a", "a.*.b", "a b", &format!("{}.com", "x".repeat(64))] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deny_rules_win_over_allow_rules_for_names() {
        let p = Policy {
            default: Action::Deny,
            domains: vec![
                DomainRule {
                    pattern: DomainPattern::parse("*.example.com").unwrap(),
                    action: Action::Allow,
                },
                DomainRule {
                    pattern: DomainPattern::parse("evil.example.com").unwrap(),
                    action: Action::Deny,
                },
            ],
            ..Policy::default()
        };
        assert_eq!(p.name_verdict("www.example.com"), NameVerdict::AllowedBy(0));
        assert_eq!(p.name_verdict("evil.example.com"), NameVerdict::DeniedBy(1));
        assert_eq!(p.name_verdict("other.org"), NameVerdict::Default(Action::Deny));
    }

    #[test]
    fn longest_cidr_prefix_decides_rebinding_checks() {
        let p = Policy {
            cidrs: vec![
                CidrRule { cidr: Cidr::parse("10.0.0.0/8").unwrap(), action: Action::Deny },
                CidrRule { cidr: Cidr::parse("10.9.0.0/16").unwrap(), action: Action::Allow },
            ],
            ..Policy::default()
        };
        assert!(p.cidr_denies("10.1.1.1".parse().unwrap(), None));
        assert!(!p.cidr_denies("10.9.1.1".parse().unwrap(), None));
        assert!(!p.cidr_denies("8.8.8.8".parse().unwrap(), None));
        let iso = Cidr::parse("10.201.0.0/16").ok();
        assert!(p.cidr_denies("10.201.0.6".parse().unwrap(), iso));
    }

    #[test]
    fn validation_bounds_everything() {
        let mut p = Policy::default();
        assert!(p.validate().is_ok());
        p.egress_rate = Some(RateLimit { bytes_per_sec: 0, burst_bytes: 10_000 });
        assert_eq!(p.validate(), Err(PolicyError::BadRate(0)));
        p.egress_rate = Some(RateLimit { bytes_per_sec: 1000, burst_bytes: 10 });
        assert!(matches!(p.validate(), Err(PolicyError::BadBurst { .. })));
        p.egress_rate = None;
        p.expose = vec![
            Exposure { proto: Proto::Tcp, slot_port: 80, guest_port: 8080 },
            Exposure { proto: Proto::Tcp, slot_port: 80, guest_port: 9090 },
        ];
        assert!(matches!(p.validate(), Err(PolicyError::BadExposure(_))));
        p.expose.clear();
        p.cidrs =
            vec![CidrRule { cidr: Cidr::parse("1.0.0.0/8").unwrap(), action: Action::Deny }; 257];
        assert!(matches!(p.validate(), Err(PolicyError::TooMany { .. })));
        // Serde refuses bad patterns too.
        let bad: Result<DomainRule, _> =
            serde_json::from_str(r#"{"pattern":"a..b","action":"allow"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn rule_ids_round_trip() {
        assert_eq!(RuleRef::from_id(0), RuleRef::Default);
        assert_eq!(RuleRef::from_id(CIDR_RULE_BASE + 3), RuleRef::Cidr(3));
        assert_eq!(RuleRef::from_id(DOMAIN_RULE_BASE + 2), RuleRef::Domain(2));
        assert_eq!(RuleRef::from_id(RULE_ISOLATION), RuleRef::Isolation);
        assert_eq!(RuleRef::from_id(crate::dataplane::maps::RULE_DNS), RuleRef::Dns);
    }
}
