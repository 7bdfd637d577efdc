//! What a token allows, in two directions. `Restriction` is what `mint` and `attenuate`
//! write into a block as Datalog checks; `Compiled` is what latchkey reads back out of a
//! block for the request path, so that a cached token is checked with a few string
//! comparisons instead of a Datalog run. A block written in any other shape (extra facts,
//! rules, scopes, other operators) is not compiled: such a token is checked by Biscuit's
//! own authorizer on every request instead (slower, same answer).
//!
//! The request facts the checks see, one of each (absent ones never match):
//! `host("api.example.com")`, `port(443)`, `path("/v1/messages")` (canonical, absent for
//! a path servers may read differently), `method("POST")` (absent when a method override
//! claims another method), `time(2026-01-01T00:00:00Z)`, `agent("name")` (only for a
//! request authenticated as an `[agents.NAME]`).

use std::collections::BTreeSet;

use biscuit_auth::builder::{Binary, BlockBuilder, Check, CheckKind, Op, Rule, Term};

use crate::policy::pattern::HostPattern;
use crate::policy::{Host, Pattern};

/// A host a token may be used for: `api.example.com`, `.example.com` (the domain and
/// its subdomains) or `*.example.com` (subdomains only). IPs are exact hosts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostRule {
    Exact(String),
    Suffix(String),
    Glob(String),
}

impl HostRule {
    pub fn parse(raw: &str) -> Result<HostRule, String> {
        let p = Pattern::parse(raw).map_err(|e| e.to_string())?;
        if p.port.is_some() {
            return Err(format!("{raw:?}: a token host has no port (use --port)"));
        }
        HostRule::from_pattern(&p).ok_or_else(|| {
            format!("{raw:?}: a token host is a name, .suffix, *.glob or IP (no regex, CIDR or *)")
        })
    }

    /// The rule for a config pattern, when a token can express it (ports aside).
    pub fn from_pattern(p: &Pattern) -> Option<HostRule> {
        match &p.host {
            HostPattern::Exact(d) => Some(HostRule::Exact(d.clone())),
            HostPattern::Suffix(d) => Some(HostRule::Suffix(d.clone())),
            HostPattern::Glob(d) => Some(HostRule::Glob(d.clone())),
            HostPattern::Ip(ip) => Some(HostRule::Exact(Host::Ip(*ip).to_string())),
            HostPattern::Regex(_) | HostPattern::Cidr(_) | HostPattern::Any => None,
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostRule::Exact(h) => host == h,
            HostRule::Suffix(d) => host == d || (host.ends_with(d.as_str()) && is_label_edge(host, d)),
            HostRule::Glob(d) => host.ends_with(d.as_str()) && is_label_edge(host, d),
        }
    }
}

fn is_label_edge(host: &str, domain: &str) -> bool {
    host.len() > domain.len() && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
}

impl std::fmt::Display for HostRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostRule::Exact(h) => f.write_str(h),
            HostRule::Suffix(d) => write!(f, ".{d}"),
            HostRule::Glob(d) => write!(f, "*.{d}"),
        }
    }
}

/// One block's worth of narrowing. Every non-empty list must hold (any of its entries);
/// an empty list restricts nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restriction {
    pub hosts: Vec<HostRule>,
    pub ports: Vec<u16>,
    /// Canonical path prefixes without trailing slash, matched on whole segments.
    pub paths: Vec<String>,
    /// Upper-case method names, compared exactly.
    pub methods: Vec<String>,
    pub agents: Vec<String>,
    /// Unix seconds: valid up to and including this second.
    pub not_after: Option<u64>,
}

impl Restriction {
    pub fn is_empty(&self) -> bool {
        *self == Restriction::default()
    }

    /// The Datalog checks for this restriction, appended to `block`. Values go in as
    /// parameters, never spliced into the source text.
    pub fn write(&self, mut block: BlockBuilder) -> Result<BlockBuilder, String> {
        let mut host_terms = Vec::new();
        for h in &self.hosts {
            match h {
                HostRule::Exact(x) => host_terms.push((Binary::HeterogeneousEqual, Term::Str(x.clone()))),
                HostRule::Suffix(d) => {
                    host_terms.push((Binary::HeterogeneousEqual, Term::Str(d.clone())));
                    host_terms.push((Binary::Suffix, Term::Str(format!(".{d}"))));
                }
                HostRule::Glob(d) => host_terms.push((Binary::Suffix, Term::Str(format!(".{d}")))),
            }
        }
        let mut path_terms = Vec::new();
        for p in self.paths.iter().filter(|p| !p.is_empty()) {
            path_terms.push((Binary::HeterogeneousEqual, Term::Str(p.clone())));
            path_terms.push((Binary::Prefix, Term::Str(format!("{p}/"))));
        }
        // A root prefix among others allows every path: no check at all.
        if self.paths.iter().any(String::is_empty) {
            path_terms.clear();
        }
        let eq = |v: Term| (Binary::HeterogeneousEqual, v);
        let checks = [
            (Fact::Host, host_terms),
            (Fact::Port, self.ports.iter().map(|p| eq(Term::Integer(i64::from(*p)))).collect()),
            (Fact::Path, path_terms),
            (Fact::Method, self.methods.iter().map(|m| eq(Term::Str(m.clone()))).collect()),
            (Fact::Agent, self.agents.iter().map(|a| eq(Term::Str(a.clone()))).collect()),
            (Fact::Time, self.not_after.map(|t| (Binary::LessOrEqual, Term::Date(t))).into_iter().collect()),
        ];
        for (fact, terms) in checks {
            if !terms.is_empty() {
                block = block.check(check(fact, terms)).map_err(|e| e.to_string())?;
            }
        }
        Ok(block)
    }
}

/// `check if F($F), $F OP v1 or F($F), $F OP v2 ...`
fn check(fact: Fact, terms: Vec<(Binary, Term)>) -> Check {
    let var = fact.name().to_string();
    let queries = terms
        .into_iter()
        .map(|(op, value)| {
            Rule::new(
                biscuit_auth::builder::pred::<Term>("query", &[]),
                vec![biscuit_auth::builder::pred(fact.name(), &[Term::Variable(var.clone())])],
                vec![biscuit_auth::builder::Expression {
                    ops: vec![Op::Value(Term::Variable(var.clone())), Op::Value(value), Op::Binary(op)],
                }],
                vec![],
            )
        })
        .collect();
    Check { queries, kind: CheckKind::One }
}

/// The request facts a check may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fact {
    Host,
    Port,
    Path,
    Method,
    Agent,
    Time,
}

impl Fact {
    pub const ALL: [Fact; 6] = [Fact::Host, Fact::Port, Fact::Path, Fact::Method, Fact::Agent, Fact::Time];

    pub fn name(self) -> &'static str {
        match self {
            Fact::Host => "host",
            Fact::Port => "port",
            Fact::Path => "path",
            Fact::Method => "method",
            Fact::Agent => "agent",
            Fact::Time => "time",
        }
    }

    fn parse(name: &str) -> Option<Fact> {
        Fact::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// The request as the checks see it (see the module comment for absent facts).
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub host: &'a str,
    pub port: u16,
    pub path: Option<&'a str>,
    pub method: Option<&'a str>,
    pub agent: Option<&'a str>,
    /// Unix seconds.
    pub now: u64,
}

impl Request<'_> {
    fn value(&self, fact: Fact) -> Option<Value<'_>> {
        match fact {
            Fact::Host => Some(Value::Str(self.host)),
            Fact::Port => Some(Value::Int(i64::from(self.port))),
            Fact::Path => self.path.map(Value::Str),
            Fact::Method => self.method.map(Value::Str),
            Fact::Agent => self.agent.map(Value::Str),
            Fact::Time => Some(Value::Date(self.now)),
        }
    }

    /// The Datalog facts for Biscuit's authorizer (the slow path, and tests).
    pub fn facts(&self) -> Vec<biscuit_auth::builder::Fact> {
        Fact::ALL
            .into_iter()
            .filter_map(|f| {
                let term = match self.value(f)? {
                    Value::Str(s) => Term::Str(s.to_string()),
                    Value::Int(i) => Term::Integer(i),
                    Value::Date(d) => Term::Date(d),
                };
                Some(biscuit_auth::builder::fact(f.name(), &[term]))
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Date(u64),
}

/// One `F($v), $v OP literal` query, typed so that it can never be an evaluation error
/// in Biscuit either (mismatched types are not compiled).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Test {
    Eq(Literal),
    Prefix(String),
    Suffix(String),
    Cmp(Cmp, Literal),
    In(Vec<Literal>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Literal {
    Str(String),
    Int(i64),
    Date(u64),
}

impl Literal {
    fn from_term(t: &Term) -> Option<Literal> {
        match t {
            Term::Str(s) => Some(Literal::Str(s.clone())),
            Term::Integer(i) => Some(Literal::Int(*i)),
            Term::Date(d) => Some(Literal::Date(*d)),
            _ => None,
        }
    }

    fn fits(&self, fact: Fact) -> bool {
        matches!(
            (self, fact),
            (Literal::Int(_), Fact::Port)
                | (Literal::Date(_), Fact::Time)
                | (Literal::Str(_), Fact::Host | Fact::Path | Fact::Method | Fact::Agent)
        )
    }

    fn equals(&self, v: Value<'_>) -> bool {
        match (self, v) {
            (Literal::Str(a), Value::Str(b)) => a == b,
            (Literal::Int(a), Value::Int(b)) => *a == b,
            (Literal::Date(a), Value::Date(b)) => *a == b,
            _ => false,
        }
    }

    fn order(&self, v: Value<'_>) -> Option<std::cmp::Ordering> {
        match (v, self) {
            (Value::Int(a), Literal::Int(b)) => Some(a.cmp(b)),
            (Value::Date(a), Literal::Date(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Query {
    fact: Fact,
    test: Test,
}

impl Query {
    /// `F($v)` with `$v OP literal` (or `{set}.contains($v)`), nothing more.
    fn compile(rule: &Rule) -> Option<Query> {
        if !rule.scopes.is_empty() || rule.body.len() != 1 || rule.expressions.len() != 1 {
            return None;
        }
        let pred = &rule.body[0];
        let fact = Fact::parse(&pred.name)?;
        let [Term::Variable(var)] = pred.terms.as_slice() else { return None };
        let is_var = |op: &Op| matches!(op, Op::Value(Term::Variable(v)) if v == var);
        let test = match rule.expressions[0].ops.as_slice() {
            [a, Op::Value(lit), Op::Binary(op)] if is_var(a) => {
                let lit = Literal::from_term(lit).filter(|l| l.fits(fact))?;
                match (op, lit) {
                    (Binary::Equal | Binary::HeterogeneousEqual, l) => Test::Eq(l),
                    (Binary::Prefix, Literal::Str(s)) => Test::Prefix(s),
                    (Binary::Suffix, Literal::Str(s)) => Test::Suffix(s),
                    (Binary::LessThan, l @ (Literal::Int(_) | Literal::Date(_))) => Test::Cmp(Cmp::Lt, l),
                    (Binary::LessOrEqual, l @ (Literal::Int(_) | Literal::Date(_))) => Test::Cmp(Cmp::Le, l),
                    (Binary::GreaterThan, l @ (Literal::Int(_) | Literal::Date(_))) => Test::Cmp(Cmp::Gt, l),
                    (Binary::GreaterOrEqual, l @ (Literal::Int(_) | Literal::Date(_))) => {
                        Test::Cmp(Cmp::Ge, l)
                    }
                    _ => return None,
                }
            }
            [Op::Value(Term::Set(set)), b, Op::Binary(Binary::Contains)] if is_var(b) => {
                let items: Option<Vec<Literal>> =
                    set.iter().map(|t| Literal::from_term(t).filter(|l| l.fits(fact))).collect();
                Test::In(items?)
            }
            _ => return None,
        };
        Some(Query { fact, test })
    }

    fn accepts(&self, req: &Request<'_>) -> bool {
        let Some(v) = req.value(self.fact) else { return false };
        match &self.test {
            Test::Eq(l) => l.equals(v),
            Test::Prefix(p) => matches!(v, Value::Str(s) if s.starts_with(p.as_str())),
            Test::Suffix(p) => matches!(v, Value::Str(s) if s.ends_with(p.as_str())),
            Test::In(set) => set.iter().any(|l| l.equals(v)),
            Test::Cmp(cmp, l) => l.order(v).is_some_and(|o| match cmp {
                Cmp::Lt => o.is_lt(),
                Cmp::Le => o.is_le(),
                Cmp::Gt => o.is_gt(),
                Cmp::Ge => o.is_ge(),
            }),
        }
    }

    /// The last second this query can hold, when it bounds time from above.
    fn deadline(&self) -> Option<u64> {
        match (&self.fact, &self.test) {
            (Fact::Time, Test::Cmp(Cmp::Le, Literal::Date(t))) => Some(*t),
            (Fact::Time, Test::Cmp(Cmp::Lt, Literal::Date(t))) => Some(t.saturating_sub(1)),
            (Fact::Time, Test::Eq(Literal::Date(t))) => Some(*t),
            (Fact::Time, Test::In(set)) => {
                set.iter().map(|l| if let Literal::Date(d) = l { *d } else { 0 }).max()
            }
            _ => None,
        }
    }
}

/// One `check if` of a block, compiled, with its source for refusals.
#[derive(Clone, Debug)]
pub struct CompiledCheck {
    queries: Vec<Query>,
    pub source: String,
}

impl CompiledCheck {
    fn compile(check: &Check) -> Option<CompiledCheck> {
        if check.kind != CheckKind::One || check.queries.is_empty() {
            return None;
        }
        let queries = check.queries.iter().map(Query::compile).collect::<Option<Vec<_>>>()?;
        Some(CompiledCheck { queries, source: check.to_string() })
    }

    pub fn accepts(&self, req: &Request<'_>) -> bool {
        self.queries.iter().any(|q| q.accepts(req))
    }

    /// What the check is about, for the refusal: the one fact all its queries name
    /// (`time` reads as `expiry`), else `check`.
    pub fn subject(&self) -> &'static str {
        let first = self.queries[0].fact;
        match first {
            _ if self.queries.iter().any(|q| q.fact != first) => "check",
            Fact::Time => "expiry",
            f => f.name(),
        }
    }

    fn deadline(&self) -> Option<u64> {
        // The check holds until the last of its queries stops holding; a query that
        // does not bound time keeps it open for ever.
        self.queries.iter().map(Query::deadline).collect::<Option<Vec<_>>>()?.into_iter().max()
    }
}

/// A block read back for the fast path: its checks, all of which must hold.
#[derive(Clone, Debug, Default)]
pub struct CompiledBlock {
    pub checks: Vec<CompiledCheck>,
}

impl CompiledBlock {
    /// `None` when the block holds anything but compilable checks (then `facts` may be
    /// what the authority block declares: latchkey's `credential` fact).
    pub fn compile(source: &BlockBuilder, allowed_facts: &[&str]) -> Option<CompiledBlock> {
        if !source.rules.is_empty() || !source.scopes.is_empty() {
            return None;
        }
        if source.facts.iter().any(|f| !allowed_facts.contains(&f.predicate.name.as_str())) {
            return None;
        }
        let checks = source.checks.iter().map(CompiledCheck::compile).collect::<Option<Vec<_>>>()?;
        Some(CompiledBlock { checks })
    }

    /// The first check that refuses the request.
    pub fn refusing(&self, req: &Request<'_>) -> Option<(usize, &CompiledCheck)> {
        self.checks.iter().enumerate().find(|(_, c)| !c.accepts(req))
    }

    /// The last second any request can pass this block.
    pub fn deadline(&self) -> Option<u64> {
        self.checks.iter().filter_map(CompiledCheck::deadline).min()
    }
}

/// The set of unique values, for printing sets the way a reader expects.
pub fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    v.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect()
}

/// The reference predicate: what a stack of restrictions allows, written directly from
/// their meaning (the property tests hold the Datalog and the compiled form to it).
pub fn allows(restrictions: &[Restriction], req: &Request<'_>) -> bool {
    restrictions.iter().all(|r| {
        let any_or_empty = |empty: bool, hit: bool| empty || hit;
        any_or_empty(r.hosts.is_empty(), r.hosts.iter().any(|h| h.matches(req.host)))
            && any_or_empty(r.ports.is_empty(), r.ports.contains(&req.port))
            && any_or_empty(
                r.paths.is_empty() || r.paths.iter().any(String::is_empty),
                req.path.is_some_and(|p| r.paths.iter().any(|pre| crate::policy::path_has_prefix(p, pre))),
            )
            && any_or_empty(
                r.methods.is_empty(),
                req.method.is_some_and(|m| r.methods.iter().any(|x| x == m)),
            )
            && any_or_empty(r.agents.is_empty(), req.agent.is_some_and(|a| r.agents.iter().any(|x| x == a)))
            && r.not_after.is_none_or(|t| req.now <= t)
    })
}
