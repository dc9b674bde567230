//! Gateway API `HTTPRoute` specs, read: the typed form a waypoint applies (Gateway API v1, and
//! the experimental `retry` of GEP-1731), and [`parse`], which produces it.
//!
//! A route reaches proxies with its `spec` as written ([`crate::HttpRoute::spec`]); the
//! controller (which reports) and the waypoint (which applies) both read it here, so they agree
//! on what every rule means. [`parse`] reads rule by rule: a rule it cannot understand entirely
//! is skipped alone, with a [`Problem`] naming the field (`spec.rules[2].filters[0].type`), and
//! every other rule still applies. A field this reader does not know is such a problem too: a
//! rule is applied as written or not at all, never with a part silently ignored.
//!
//! The spec is walked by hand rather than through a derived `Deserialize`: a derived decoder
//! stops at the first error of the whole spec and cannot say which field it was in, and this
//! crate stays without a path-tracking decoder. Field names are the Gateway API's (camelCase);
//! defaults are the Gateway API's (a rule without matches matches every path; a match without
//! a path matches `PathPrefix /`; a backend's weight is 1). `docs/ARCHITECTURE.md` §9.4 lists
//! what is supported and what is refused.
//!
//! Regular expressions are carried, not compiled: this crate has no regular-expression engine
//! (ztunnel links it and stays small). [`Rule::regexes`] lists them with their fields; the
//! waypoint compiles them, and the controller checks them with [`ParsedRoute::check_regexes`],
//! both under [`REGEX_SIZE_LIMIT`].

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

/// The most one regular expression of a route may compile to, in bytes (the `regex` crate's
/// `size_limit`). Path and header patterns compile to a few KiB; the limit keeps one route from
/// making every waypoint allocate megabytes (the crate's own default is 10 MiB).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// The largest backend weight the Gateway API allows.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// What [`parse`] read of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRoute {
    /// One entry per rule of `spec.rules`, in order (a spec without `rules` has the Gateway
    /// API's default: one rule matching every path, with no backend); `None` for a rule
    /// skipped because of a problem.
    pub rules: Vec<Option<Rule>>,
    /// The first problem of each skipped rule, and problems outside any rule (an unknown
    /// field of `spec`), which skip nothing.
    pub problems: Vec<Problem>,
}

/// Something of a route that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field at fault, from the route's `spec` (`spec.rules[2].filters[0].type`).
    pub field: String,
    /// Why, for the operator.
    pub reason: String,
    /// The rule skipped because of it (its index in `spec.rules`); none when the problem is
    /// outside every rule and skips nothing.
    pub rule: Option<usize>,
}

/// One rule of a route: when it applies (`matches`, any of them), what it does to the request
/// (`filters`, in order), and where it sends it (`backends`, by weight).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its index in `spec.rules`.
    pub index: usize,
    /// `name`, when given (Gateway API `SectionName`); for logs.
    pub name: Option<String>,
    /// Never empty: a rule written without matches matches every path (`PathPrefix /`).
    pub matches: Vec<Match>,
    pub filters: Vec<Filter>,
    /// Empty when the rule has none: requests it matches are answered 500 unless a filter
    /// answers them (a redirect).
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    /// `retry`; none when the rule has no retry stanza.
    pub retry: Option<Retry>,
}

/// A request matches when every condition that is set matches.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub path: PathMatch,
    /// As written, equivalent names included (the waypoint considers the first of equivalent
    /// names only, as the Gateway API requires).
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryParamMatch>,
    pub method: Option<Method>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path, case-sensitive.
    Exact(String),
    /// Whole path segments: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`; a
    /// trailing `/` of the value is ignored.
    PathPrefix(String),
    /// A pattern the whole path must match (the `regex` crate's syntax).
    RegularExpression(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Compared case-insensitively.
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryParamMatch {
    /// Compared exactly.
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    /// A pattern the whole value must match.
    RegularExpression(String),
}

/// The methods a match may name (Gateway API `HTTPMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

/// A filter, in the order the rule (or backend) lists them.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    /// Rule filters only, and never with backends: it answers the request itself.
    RequestRedirect(Redirect),
    UrlRewrite(Rewrite),
    RequestMirror(Mirror),
}

/// Header changes. A header name appears at most once across `set`, `add` and `remove` (the
/// Gateway API allows one action per name), so their order does not matter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderModifier {
    /// Replaces every value of the header.
    pub set: Vec<Header>,
    /// Appends a value.
    pub add: Vec<Header>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// Answers the request with a redirection; every part left unset keeps the request's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<Scheme>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status_code: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    /// The whole path becomes this.
    ReplaceFullPath(String),
    /// The matched prefix (the rule's one `PathPrefix` match) becomes this; may be empty.
    ReplacePrefixMatch(String),
}

/// Changes the request before it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// Replaces the `Host` (`:authority`).
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// Sends a copy of a share of requests to another service; its answers are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub backend: BackendTarget,
    /// The share of requests mirrored (`percent`, or `fraction`; all when neither is given).
    pub fraction: Fraction,
}

/// `numerator / denominator`, with `numerator <= denominator` and `denominator >= 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

/// A Service port of the route's own namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTarget {
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub target: BackendTarget,
    /// 0 to [`MAX_WEIGHT`]; 1 when not written. A backend of weight 0 receives nothing.
    pub weight: u32,
    /// Applied only to requests sent to this backend, after the rule's; never a redirect.
    pub filters: Vec<Filter>,
}

/// Gateway API timeouts (GEP-1742). `None` is no timeout: the field was not written (the
/// Gateway API leaves that default to the implementation; Weft's is none) or was `0s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// The whole exchange with the client, retries included.
    pub request: Option<Duration>,
    /// Each attempt to a backend; never longer than `request`.
    pub backend_request: Option<Duration>,
}

/// A retry stanza (GEP-1731) as written; the waypoint supplies what is not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Response statuses (400 to 599) retried, besides failures to connect.
    pub codes: Vec<u16>,
    /// Retries after the first attempt; `Some(0)` disables retries.
    pub attempts: Option<u32>,
    /// The base interval between attempts.
    pub backoff: Option<Duration>,
}

/// Reads a route's `spec` (as written) for a route of `namespace`. Never fails as a whole:
/// what cannot be understood is in [`ParsedRoute::problems`], and the rules it concerns are
/// skipped.
pub fn parse(namespace: &str, spec: &Value) -> ParsedRoute {
    let mut problems = Vec::new();
    let empty = Map::new();
    let map = match spec {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => {
            problems.push(bad("spec", format!("expected an object, found {}", kind_of(other))));
            return ParsedRoute { rules: Vec::new(), problems };
        }
    };
    for key in map.keys() {
        if !SPEC_FIELDS.contains(&key.as_str()) {
            problems.push(bad(format!("spec.{key}"), unknown_field(SPEC_FIELDS)));
        }
    }
    let rules = match map.get("rules") {
        None | Some(Value::Null) => vec![Some(Rule::everything(0))],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match rule(i, item, namespace) {
                Ok(rule) => Some(rule),
                Err(problem) => {
                    problems.push(Problem { rule: Some(i), ..problem });
                    None
                }
            })
            .collect(),
        Some(other) => {
            problems.push(bad("spec.rules", format!("expected a list, found {}", kind_of(other))));
            Vec::new()
        }
    };
    ParsedRoute { rules, problems }
}

/// A Gateway API duration (GEP-2257): one to four groups of 1 to 5 digits and a unit (`h`,
/// `m`, `s`, `ms`), as in `1h30m` or `500ms`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    const MAX_GROUPS: usize = 4;
    const MAX_DIGITS: usize = 5;
    let bytes = text.as_bytes();
    let (mut at, mut groups, mut total) = (0, 0, Duration::ZERO);
    while at < bytes.len() {
        let start = at;
        while bytes.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start || at - start > MAX_DIGITS {
            return None;
        }
        // At most five digits: fits a u32.
        let n: u32 = text[start..at].parse().ok()?;
        let unit = match (bytes.get(at), bytes.get(at + 1)) {
            (Some(b'h'), _) => Duration::from_secs(3600),
            (Some(b'm'), Some(b's')) => Duration::from_millis(1),
            (Some(b'm'), _) => Duration::from_secs(60),
            (Some(b's'), _) => Duration::from_secs(1),
            _ => return None,
        };
        at += if unit == Duration::from_millis(1) { 2 } else { 1 };
        total += unit * n;
        groups += 1;
        if groups > MAX_GROUPS {
            return None;
        }
    }
    (groups > 0).then_some(total)
}

impl ParsedRoute {
    /// The rules that can be applied, in order.
    pub fn valid(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().flatten()
    }

    /// Skips every rule with a regular expression `compile` refuses, with a problem naming
    /// it. For readers that only check (the controller); the waypoint compiles as it builds.
    pub fn check_regexes(&mut self, mut compile: impl FnMut(&str) -> Result<(), String>) {
        for slot in &mut self.rules {
            let Some(rule) = slot else { continue };
            let refused = rule.regexes().into_iter().find_map(|(field, pattern)| {
                compile(pattern).err().map(|why| Problem { field, reason: why, rule: Some(rule.index) })
            });
            if let Some(problem) = refused {
                self.problems.push(problem);
                *slot = None;
            }
        }
    }
}

impl Rule {
    /// The Gateway API's default rule: every path, no filter, no backend.
    fn everything(index: usize) -> Rule {
        Rule {
            index,
            name: None,
            matches: vec![Match::everything()],
            filters: Vec::new(),
            backends: Vec::new(),
            timeouts: Timeouts::default(),
            retry: None,
        }
    }

    /// Every regular expression of the rule's matches, with its field
    /// (`spec.rules[0].matches[1].headers[0].value`).
    pub fn regexes(&self) -> Vec<(String, &str)> {
        let mut found = Vec::new();
        for (j, m) in self.matches.iter().enumerate() {
            let at = format!("spec.rules[{}].matches[{j}]", self.index);
            if let PathMatch::RegularExpression(pattern) = &m.path {
                found.push((format!("{at}.path.value"), pattern.as_str()));
            }
            for (k, h) in m.headers.iter().enumerate() {
                if let ValueMatch::RegularExpression(pattern) = &h.value {
                    found.push((format!("{at}.headers[{k}].value"), pattern.as_str()));
                }
            }
            for (k, q) in m.query_params.iter().enumerate() {
                if let ValueMatch::RegularExpression(pattern) = &q.value {
                    found.push((format!("{at}.queryParams[{k}].value"), pattern.as_str()));
                }
            }
        }
        found
    }

    /// The value of the rule's `PathPrefix` match when it has exactly one match and that is
    /// one: the prefix a `ReplacePrefixMatch` replaces.
    pub fn single_prefix(&self) -> Option<&str> {
        match self.matches.as_slice() {
            [Match { path: PathMatch::PathPrefix(prefix), .. }] => Some(prefix),
            _ => None,
        }
    }
}

impl Match {
    fn everything() -> Match {
        Match {
            path: PathMatch::PathPrefix("/".to_owned()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }
    }
}

impl Method {
    pub const ALL: [Method; 9] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Delete,
        Method::Connect,
        Method::Options,
        Method::Trace,
        Method::Patch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Patch => "PATCH",
        }
    }
}

impl Filter {
    /// The Gateway API's name of the filter's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Filter::RequestHeaderModifier(_) => "RequestHeaderModifier",
            Filter::ResponseHeaderModifier(_) => "ResponseHeaderModifier",
            Filter::RequestRedirect(_) => "RequestRedirect",
            Filter::UrlRewrite(_) => "URLRewrite",
            Filter::RequestMirror(_) => "RequestMirror",
        }
    }

    fn path_modifier(&self) -> Option<&PathModifier> {
        match self {
            Filter::RequestRedirect(r) => r.path.as_ref(),
            Filter::UrlRewrite(r) => r.path.as_ref(),
            _ => None,
        }
    }
}

impl Fraction {
    pub const ALL: Fraction = Fraction { numerator: 1, denominator: 1 };
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl fmt::Display for BackendTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
    }
}

// The reader.

const SPEC_FIELDS: &[&str] = &["parentRefs", "hostnames", "rules"];
const RULE_FIELDS: &[&str] = &["name", "matches", "filters", "backendRefs", "timeouts", "retry"];
const MATCH_FIELDS: &[&str] = &["path", "headers", "queryParams", "method"];
const FILTER_FIELDS: &[&str] = &[
    "type",
    "requestHeaderModifier",
    "responseHeaderModifier",
    "requestRedirect",
    "urlRewrite",
    "requestMirror",
    "cors",
    "externalAuth",
    "extensionRef",
];
const BACKEND_FIELDS: &[&str] = &["group", "kind", "name", "namespace", "port", "weight", "filters"];
const BACKEND_OBJECT_FIELDS: &[&str] = &["group", "kind", "name", "namespace", "port"];
const PATH_MODIFIER_FIELDS: &[&str] = &["type", "replaceFullPath", "replacePrefixMatch"];
/// Gateway API fields this reader knows and does not support: named as such, not as typos.
const UNSUPPORTED_FIELDS: &[&str] = &["sessionPersistence"];
const SUPPORTED_FILTERS: &str =
    "RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror";
/// Longest path and path-modifier values (Gateway API).
const MAX_PATH: usize = 1024;
/// Longest header value (Gateway API).
const MAX_HEADER_VALUE: usize = 4096;
/// Longest query parameter value (Gateway API).
const MAX_QUERY_VALUE: usize = 1024;
/// Longest header or query parameter name (Gateway API).
const MAX_NAME: usize = 256;

/// Where a filter list is: a rule's filters may redirect, a backend's may not.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    Rule,
    Backend,
}

fn rule(index: usize, value: &Value, namespace: &str) -> Result<Rule, Problem> {
    let f = Fields::new(format!("spec.rules[{index}]"), value, RULE_FIELDS)?;
    let name = f.string("name")?.map(str::to_owned);
    let mut matches = Vec::new();
    for (at, m) in f.list("matches")? {
        matches.push(route_match(at, m)?);
    }
    if matches.is_empty() {
        matches.push(Match::everything());
    }
    let filters = filters(&f, Level::Rule, namespace)?;
    let mut backends = Vec::new();
    for (at, b) in f.list("backendRefs")? {
        backends.push(backend(at, b, namespace)?);
    }
    let timeouts = match f.object("timeouts", &["request", "backendRequest"])? {
        Some(t) => timeouts(&t)?,
        None => Timeouts::default(),
    };
    let retry = match f.object("retry", &["codes", "attempts", "backoff"])? {
        Some(r) => Some(retry(&r)?),
        None => None,
    };
    let rule = Rule { index, name, matches, filters, backends, timeouts, retry };

    if !rule.backends.is_empty()
        && let Some(i) = rule.filters.iter().position(|f| matches!(f, Filter::RequestRedirect(_)))
    {
        return Err(bad(
            format!("{}.filters[{i}].type", f.path),
            "a RequestRedirect answers the request itself: it cannot be used in a rule with backendRefs",
        ));
    }
    // Every ReplacePrefixMatch, of the rule's filters and its backends', replaces the rule's
    // one PathPrefix match.
    let rule_filters = rule.filters.iter().enumerate().map(|(i, filter)| (format!("{}.filters[{i}]", f.path), filter));
    let backend_filters = rule.backends.iter().enumerate().flat_map(|(j, b)| {
        b.filters
            .iter()
            .enumerate()
            .map(move |(i, filter)| (format!("spec.rules[{index}].backendRefs[{j}].filters[{i}]"), filter))
    });
    for (at, filter) in rule_filters.chain(backend_filters) {
        if matches!(filter.path_modifier(), Some(PathModifier::ReplacePrefixMatch(_))) && rule.single_prefix().is_none()
        {
            let config = if matches!(filter, Filter::RequestRedirect(_)) { "requestRedirect" } else { "urlRewrite" };
            return Err(bad(
                format!("{at}.{config}.path.type"),
                "ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix: the prefix it replaces",
            ));
        }
    }
    Ok(rule)
}

fn route_match(at: String, value: &Value) -> Result<Match, Problem> {
    let f = Fields::new(at, value, MATCH_FIELDS)?;
    let path = match f.object("path", &["type", "value"])? {
        None => PathMatch::PathPrefix("/".to_owned()),
        Some(p) => {
            let value = p.string("value")?.unwrap_or("/");
            match p.string("type")?.unwrap_or("PathPrefix") {
                "Exact" => PathMatch::Exact(path_value(&p.at("value"), value)?),
                "PathPrefix" => PathMatch::PathPrefix(path_value(&p.at("value"), value)?),
                "RegularExpression" => PathMatch::RegularExpression(pattern(&p.at("value"), value, MAX_PATH)?),
                other => {
                    return Err(bad(
                        p.at("type"),
                        format!("{other:?} is not a path match type (Exact, PathPrefix or RegularExpression)"),
                    ));
                }
            }
        }
    };
    let mut headers = Vec::new();
    for (at, h) in f.list("headers")? {
        let (name, value) = name_value_match(at, h, MAX_HEADER_VALUE)?;
        headers.push(HeaderMatch { name, value });
    }
    let mut query_params = Vec::new();
    for (at, q) in f.list("queryParams")? {
        let (name, value) = name_value_match(at, q, MAX_QUERY_VALUE)?;
        query_params.push(QueryParamMatch { name, value });
    }
    let method = match f.string("method")? {
        None => None,
        Some(text) => Some(Method::ALL.into_iter().find(|m| m.as_str() == text).ok_or_else(|| {
            let all: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
            bad(f.at("method"), format!("{text:?} is not a method ({})", all.join(", ")))
        })?),
    };
    Ok(Match { path, headers, query_params, method })
}

/// A header or query parameter match: `{type, name, value}`.
fn name_value_match(at: String, value: &Value, max_value: usize) -> Result<(String, ValueMatch), Problem> {
    let f = Fields::new(at, value, &["type", "name", "value"])?;
    let name = header_name(&f.at("name"), f.required("name")?)?;
    let text = f.required("value")?;
    let value = match f.string("type")?.unwrap_or("Exact") {
        "Exact" => {
            if text.is_empty() || text.len() > max_value {
                return Err(bad(f.at("value"), format!("must be 1 to {max_value} characters")));
            }
            if text.chars().any(|c| c.is_control() && c != '\t') {
                return Err(bad(f.at("value"), "must not contain control characters"));
            }
            ValueMatch::Exact(text.to_owned())
        }
        "RegularExpression" => ValueMatch::RegularExpression(pattern(&f.at("value"), text, max_value)?),
        other => {
            return Err(bad(f.at("type"), format!("{other:?} is not a match type (Exact or RegularExpression)")));
        }
    };
    Ok((name, value))
}

/// The filters of a rule or a backend, with the Gateway API's rules on repeats and
/// combinations.
fn filters(parent: &Fields<'_>, level: Level, namespace: &str) -> Result<Vec<Filter>, Problem> {
    let mut found: Vec<Filter> = Vec::new();
    for (i, (at, value)) in parent.list("filters")?.into_iter().enumerate() {
        let filter = filter(&at, value, level, namespace)?;
        let repeatable = matches!(filter, Filter::RequestMirror(_));
        if !repeatable && found.iter().any(|f| f.type_name() == filter.type_name()) {
            return Err(bad(format!("{at}.type"), format!("a {} filter cannot be repeated", filter.type_name())));
        }
        let clash = |a: &Filter, b: &Filter| {
            matches!(
                (a, b),
                (Filter::RequestRedirect(_), Filter::UrlRewrite(_))
                    | (Filter::UrlRewrite(_), Filter::RequestRedirect(_))
            )
        };
        if found.iter().any(|f| clash(f, &filter)) {
            return Err(bad(
                format!("{}.filters[{i}].type", parent.path),
                "RequestRedirect and URLRewrite cannot be combined: a redirect forwards nothing to rewrite",
            ));
        }
        found.push(filter);
    }
    Ok(found)
}

fn filter(at: &str, value: &Value, level: Level, namespace: &str) -> Result<Filter, Problem> {
    let f = Fields::new(at.to_owned(), value, FILTER_FIELDS)?;
    let kind = f.required("type")?;
    let config = match kind {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "RequestRedirect" => "requestRedirect",
        "URLRewrite" => "urlRewrite",
        "RequestMirror" => "requestMirror",
        "CORS" | "ExternalAuth" | "ExtensionRef" => {
            return Err(bad(
                f.at("type"),
                format!("{kind} filters are not supported by Weft's waypoint (supported: {SUPPORTED_FILTERS})"),
            ));
        }
        other => {
            return Err(bad(f.at("type"), format!("unknown filter type {other:?} (supported: {SUPPORTED_FILTERS})")));
        }
    };
    if kind == "RequestRedirect" && level == Level::Backend {
        return Err(bad(
            f.at("type"),
            "a RequestRedirect answers the request, so it cannot apply to one backend: put it in the rule's filters",
        ));
    }
    if let Some(other) = FILTER_FIELDS[1..].iter().find(|k| **k != config && f.get(k).is_some()) {
        return Err(bad(f.at(other), format!("a {kind} filter takes {config}, not {other}")));
    }
    let Some(body) = f.get(config) else {
        return Err(bad(f.at(config), format!("a {kind} filter needs {config}")));
    };
    let at = f.at(config);
    Ok(match kind {
        "RequestHeaderModifier" => Filter::RequestHeaderModifier(header_modifier(at, body)?),
        "ResponseHeaderModifier" => Filter::ResponseHeaderModifier(header_modifier(at, body)?),
        "RequestRedirect" => Filter::RequestRedirect(redirect(at, body)?),
        "URLRewrite" => Filter::UrlRewrite(rewrite(at, body)?),
        _ => Filter::RequestMirror(mirror(at, body, namespace)?),
    })
}

fn header_modifier(at: String, value: &Value) -> Result<HeaderModifier, Problem> {
    let f = Fields::new(at, value, &["set", "add", "remove"])?;
    // Each name once across the three lists: (lower-case name, its field).
    let mut names: Vec<(String, String)> = Vec::new();
    let mut claim = |name: &str, at: String| match names.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some((_, first)) => {
            Err(bad(at, format!("header {name:?} already has an action ({first}): one action per header name")))
        }
        None => {
            names.push((name.to_ascii_lowercase(), at));
            Ok(())
        }
    };
    let mut lists = [Vec::new(), Vec::new()];
    for (key, list) in ["set", "add"].into_iter().zip(&mut lists) {
        for (at, h) in f.list(key)? {
            let h = Fields::new(at.clone(), h, &["name", "value"])?;
            let name = header_name(&h.at("name"), h.required("name")?)?;
            let value = h.required("value")?;
            if value.is_empty() || value.len() > MAX_HEADER_VALUE {
                return Err(bad(h.at("value"), format!("must be 1 to {MAX_HEADER_VALUE} characters")));
            }
            if !value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
                return Err(bad(h.at("value"), "must be printable ASCII (spaces and tabs allowed)"));
            }
            claim(&name, h.at("name"))?;
            list.push(Header { name, value: value.to_owned() });
        }
    }
    let mut remove = Vec::new();
    for (at, v) in f.list("remove")? {
        let Value::String(name) = v else {
            return Err(bad(at, format!("expected a header name, found {}", kind_of(v))));
        };
        let name = header_name(&at, name)?;
        claim(&name, at)?;
        remove.push(name);
    }
    let [set, add] = lists;
    Ok(HeaderModifier { set, add, remove })
}

fn redirect(at: String, value: &Value) -> Result<Redirect, Problem> {
    let f = Fields::new(at, value, &["scheme", "hostname", "path", "port", "statusCode"])?;
    let scheme = match f.string("scheme")? {
        None => None,
        Some("http") => Some(Scheme::Http),
        Some("https") => Some(Scheme::Https),
        Some(other) => return Err(bad(f.at("scheme"), format!("{other:?} is not a scheme (http or https)"))),
    };
    let hostname = f.string("hostname")?.map(|h| hostname(&f.at("hostname"), h)).transpose()?;
    let path = f.object("path", PATH_MODIFIER_FIELDS)?.map(|p| path_modifier(&p)).transpose()?;
    let port = f.integer("port", 1, 65535)?.map(|p| p as u16);
    let status_code = match f.integer("statusCode", 0, 999)? {
        None => 302,
        Some(code @ (301 | 302 | 303 | 307 | 308)) => code as u16,
        Some(code) => {
            return Err(bad(
                f.at("statusCode"),
                format!("{code} is not a redirect status (301, 302, 303, 307 or 308)"),
            ));
        }
    };
    Ok(Redirect { scheme, hostname, path, port, status_code })
}

fn rewrite(at: String, value: &Value) -> Result<Rewrite, Problem> {
    let f = Fields::new(at, value, &["hostname", "path"])?;
    let hostname = f.string("hostname")?.map(|h| hostname(&f.at("hostname"), h)).transpose()?;
    let path = f.object("path", PATH_MODIFIER_FIELDS)?.map(|p| path_modifier(&p)).transpose()?;
    Ok(Rewrite { hostname, path })
}

fn path_modifier(f: &Fields<'_>) -> Result<PathModifier, Problem> {
    let full = f.string("replaceFullPath")?;
    let prefix = f.string("replacePrefixMatch")?;
    match f.required("type")? {
        "ReplaceFullPath" => {
            if prefix.is_some() {
                return Err(bad(f.at("replacePrefixMatch"), "type is ReplaceFullPath: set replaceFullPath only"));
            }
            let value = full.ok_or_else(|| bad(f.at("replaceFullPath"), "required when type is ReplaceFullPath"))?;
            Ok(PathModifier::ReplaceFullPath(path_value(&f.at("replaceFullPath"), value)?))
        }
        "ReplacePrefixMatch" => {
            if full.is_some() {
                return Err(bad(f.at("replaceFullPath"), "type is ReplacePrefixMatch: set replacePrefixMatch only"));
            }
            let value =
                prefix.ok_or_else(|| bad(f.at("replacePrefixMatch"), "required when type is ReplacePrefixMatch"))?;
            // Empty replaces the prefix with nothing (`/foo/bar` with prefix `/foo` becomes `/bar`).
            if !value.is_empty() {
                path_value(&f.at("replacePrefixMatch"), value)?;
            }
            Ok(PathModifier::ReplacePrefixMatch(value.to_owned()))
        }
        other => {
            Err(bad(f.at("type"), format!("{other:?} is not a path modifier (ReplaceFullPath or ReplacePrefixMatch)")))
        }
    }
}

fn mirror(at: String, value: &Value, namespace: &str) -> Result<Mirror, Problem> {
    let f = Fields::new(at, value, &["backendRef", "percent", "fraction"])?;
    let target = match f.object("backendRef", BACKEND_OBJECT_FIELDS)? {
        Some(b) => backend_target(&b, namespace)?,
        None => return Err(bad(f.at("backendRef"), "a RequestMirror needs a backendRef")),
    };
    let percent = f.integer("percent", 0, 100)?;
    let fraction = match (percent, f.object("fraction", &["numerator", "denominator"])?) {
        (Some(_), Some(_)) => return Err(bad(f.at("fraction"), "set percent or fraction, not both")),
        (Some(p), None) => Fraction { numerator: p as u32, denominator: 100 },
        (None, Some(fr)) => {
            let numerator = fr.integer("numerator", 0, i64::from(i32::MAX))?;
            let numerator = numerator.ok_or_else(|| bad(fr.at("numerator"), "required"))? as u32;
            let denominator = fr.integer("denominator", 1, i64::from(i32::MAX))?.unwrap_or(100) as u32;
            if numerator > denominator {
                return Err(bad(
                    fr.at("numerator"),
                    format!(
                        "{numerator} is more than the denominator {denominator}: at most every request is mirrored"
                    ),
                ));
            }
            Fraction { numerator, denominator }
        }
        (None, None) => Fraction::ALL,
    };
    Ok(Mirror { backend: target, fraction })
}

fn backend(at: String, value: &Value, namespace: &str) -> Result<Backend, Problem> {
    let f = Fields::new(at, value, BACKEND_FIELDS)?;
    let target = backend_target(&f, namespace)?;
    let weight = f.integer("weight", 0, i64::from(MAX_WEIGHT))?.unwrap_or(1) as u32;
    let filters = filters(&f, Level::Backend, namespace)?;
    Ok(Backend { target, weight, filters })
}

/// `group`, `kind`, `name`, `namespace`, `port` of a backend or mirror reference: a Service
/// port of the route's namespace.
fn backend_target(f: &Fields<'_>, namespace: &str) -> Result<BackendTarget, Problem> {
    match f.string("group")? {
        None | Some("" | "core") => {}
        Some(other) => {
            return Err(bad(
                f.at("group"),
                format!("only core Services can be backends (group \"\"), not group {other:?}"),
            ));
        }
    }
    match f.string("kind")? {
        None | Some("Service") => {}
        Some(other) => return Err(bad(f.at("kind"), format!("only Services can be backends, not {other:?}"))),
    }
    let name = f.required("name")?;
    if !is_dns_label(name) {
        return Err(bad(f.at("name"), format!("{name:?} is not a Service name (a DNS label)")));
    }
    if let Some(other) = f.string("namespace")?
        && other != namespace
    {
        return Err(bad(
            f.at("namespace"),
            format!(
                "a backend in another namespace ({other}) needs a ReferenceGrant, which Weft does not support: \
                 backends must be in the route's namespace ({namespace})"
            ),
        ));
    }
    let port = f.integer("port", 1, 65535)?.ok_or_else(|| bad(f.at("port"), "a Service backend needs a port"))?;
    Ok(BackendTarget { namespace: namespace.to_owned(), name: name.to_owned(), port: port as u16 })
}

fn timeouts(f: &Fields<'_>) -> Result<Timeouts, Problem> {
    let request = f.duration("request")?;
    let backend_request = f.duration("backendRequest")?;
    if let (Some((r, r_text)), Some((b, b_text))) = (request, backend_request)
        && !r.is_zero()
        && b > r
    {
        return Err(bad(
            f.at("backendRequest"),
            format!("{b_text} is longer than the request timeout {r_text}, which includes every backend request"),
        ));
    }
    let some = |d: Option<(Duration, &str)>| d.map(|(d, _)| d).filter(|d| !d.is_zero());
    Ok(Timeouts { request: some(request), backend_request: some(backend_request) })
}

fn retry(f: &Fields<'_>) -> Result<Retry, Problem> {
    let mut codes: Vec<u16> = Vec::new();
    for (at, v) in f.list("codes")? {
        let code = integer(&at, v, 400, 599)? as u16;
        if codes.contains(&code) {
            return Err(bad(at, format!("{code} is listed twice")));
        }
        codes.push(code);
    }
    let attempts = f.integer("attempts", 0, i64::from(u32::MAX))?.map(|n| n as u32);
    let backoff = f.duration("backoff")?.map(|(d, _)| d);
    Ok(Retry { codes, attempts, backoff })
}

/// An `Exact` or `PathPrefix` path, or a path a filter writes: what the Gateway API accepts.
fn path_value(at: &str, value: &str) -> Result<String, Problem> {
    let refuse = |why: &str| Err(bad(at, format!("{value:?} {why}")));
    if !value.starts_with('/') {
        return refuse("does not start with '/'");
    }
    if value.len() > MAX_PATH {
        return refuse(&format!("is longer than {MAX_PATH} characters"));
    }
    for part in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(part) {
            return refuse(&format!("contains {part:?}"));
        }
    }
    if value.ends_with("/..") || value.ends_with("/.") {
        return refuse("ends with a '.' or '..' segment");
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit) =>
            {
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b) => i += 1,
            _ => return refuse("has a character a path cannot hold unescaped (escape it as %XX)"),
        }
    }
    Ok(value.to_owned())
}

/// A regular expression, carried as written (checked where it is compiled).
fn pattern(at: &str, value: &str, max: usize) -> Result<String, Problem> {
    if value.is_empty() || value.len() > max {
        return Err(bad(at, format!("must be 1 to {max} characters")));
    }
    Ok(value.to_owned())
}

/// An HTTP header name (RFC 9110 token), as the Gateway API's `HTTPHeaderName`.
fn header_name(at: &str, name: &str) -> Result<String, Problem> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(tchar) {
        return Err(bad(
            at,
            format!("{name:?} is not a header name (1 to {MAX_NAME} letters, digits or !#$%&'*+-.^_`|~)"),
        ));
    }
    Ok(name.to_owned())
}

/// A Gateway API `PreciseHostname`: lower-case DNS labels separated by dots, no wildcard.
fn hostname(at: &str, name: &str) -> Result<String, Problem> {
    if name.is_empty() || name.len() > 253 || !name.split('.').all(is_dns_label_1123) {
        return Err(bad(at, format!("{name:?} is not a hostname (lower-case DNS labels separated by dots)")));
    }
    Ok(name.to_owned())
}

/// An RFC 1123 label: 1 to 63 lower-case letters, digits and `-`, not starting or ending with `-`.
fn is_dns_label_1123(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A Service name: an RFC 1035 label (an RFC 1123 label starting with a letter).
fn is_dns_label(name: &str) -> bool {
    is_dns_label_1123(name) && name.as_bytes()[0].is_ascii_lowercase()
}

fn integer(at: &str, value: &Value, min: i64, max: i64) -> Result<i64, Problem> {
    let n = value.as_i64().ok_or_else(|| bad(at, format!("expected a whole number, found {}", kind_of(value))))?;
    if n < min || n > max {
        return Err(bad(at, format!("{n} is out of range ({min} to {max})")));
    }
    Ok(n)
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Problem {
    Problem { field: field.into(), reason: reason.into(), rule: None }
}

fn unknown_field(known: &[&str]) -> String {
    format!("unknown field (known here: {})", known.join(", "))
}

fn kind_of(value: &Value) -> String {
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// A JSON object being read at a field path. Fields it was not told about are refused when it
/// is made; a field set to `null` reads as absent (YAML's `key:` with no value).
struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(path: String, value: &'a Value, known: &[&str]) -> Result<Fields<'a>, Problem> {
        let Value::Object(map) = value else {
            return Err(bad(path, format!("expected an object, found {}", kind_of(value))));
        };
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let reason = if UNSUPPORTED_FIELDS.contains(&key.as_str()) {
                format!("{key} is not supported by Weft's waypoint")
            } else {
                unknown_field(known)
            };
            return Err(bad(format!("{path}.{key}"), reason));
        }
        Ok(Fields { path, map })
    }

    fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, Problem> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(bad(self.at(key), format!("expected a string, found {}", kind_of(other)))),
        }
    }

    fn required(&self, key: &str) -> Result<&'a str, Problem> {
        self.string(key)?.ok_or_else(|| bad(self.at(key), "required"))
    }

    fn integer(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, Problem> {
        self.get(key).map(|v| integer(&self.at(key), v, min, max)).transpose()
    }

    /// A duration and its text.
    fn duration(&self, key: &str) -> Result<Option<(Duration, &'a str)>, Problem> {
        let Some(text) = self.string(key)? else { return Ok(None) };
        match parse_duration(text) {
            Some(d) => Ok(Some((d, text))),
            None => Err(bad(
                self.at(key),
                format!(
                    "{text:?} is not a duration (1 to 4 groups of up to 5 digits and h, m, s or ms, as in 1h30m or 500ms)"
                ),
            )),
        }
    }

    /// The items of a list field with their paths; none when absent.
    fn list(&self, key: &str) -> Result<Vec<(String, &'a Value)>, Problem> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                Ok(items.iter().enumerate().map(|(i, v)| (format!("{}.{key}[{i}]", self.path), v)).collect())
            }
            Some(other) => Err(bad(self.at(key), format!("expected a list, found {}", kind_of(other)))),
        }
    }

    /// An object field, refusing fields other than `known`.
    fn object(&self, key: &str, known: &[&str]) -> Result<Option<Fields<'a>>, Problem> {
        self.get(key).map(|value| Fields::new(self.at(key), value, known)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn only_rule(spec: Value) -> Rule {
        let parsed = parse("shop", &spec);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let [Some(rule)] = <[Option<Rule>; 1]>::try_from(parsed.rules).unwrap() else { panic!("one valid rule") };
        rule
    }

    fn target(name: &str, port: u16) -> BackendTarget {
        BackendTarget { namespace: "shop".into(), name: name.into(), port }
    }

    #[test]
    fn defaults_are_the_gateway_apis() {
        // No rules at all: one rule matching everything, with no backend.
        let parsed = parse("shop", &json!({"parentRefs": [{"kind": "Service", "name": "api"}]}));
        assert!(parsed.problems.is_empty());
        let rule = parsed.rules[0].as_ref().unwrap();
        assert_eq!(rule.matches, [Match::everything()]);
        assert!(rule.backends.is_empty() && rule.filters.is_empty() && rule.retry.is_none());
        assert_eq!(parse("shop", &Value::Null).rules.len(), 1, "no spec is the default rule too");

        // A rule without matches, a match without a path, a backend without a weight.
        let rule = only_rule(json!({"rules": [{"backendRefs": [{"name": "api-v1", "port": 80}]}]}));
        assert_eq!(rule.matches[0].path, PathMatch::PathPrefix("/".into()));
        assert_eq!(rule.backends[0].weight, 1);
        assert_eq!(rule.backends[0].target, target("api-v1", 80), "the route's namespace");
        let rule = only_rule(json!({"rules": [{"matches": [{"method": "GET"}, {"path": {"value": "/a"}}]}]}));
        assert_eq!(rule.matches[0].path, PathMatch::PathPrefix("/".into()));
        assert_eq!(rule.matches[0].method, Some(Method::Get));
        assert_eq!(rule.matches[1].path, PathMatch::PathPrefix("/a".into()), "type defaults to PathPrefix");
        let rule = only_rule(json!({"rules": [{"matches": [{"path": {"type": "Exact"}}]}]}));
        assert_eq!(rule.matches[0].path, PathMatch::Exact("/".into()), "value defaults to /");

        let rule = only_rule(json!({"rules": [{
            "matches": [{"headers": [{"name": "x-v", "value": "2"}], "queryParams": [{"name": "q", "value": "1"}]}],
            "filters": [
                {"type": "RequestRedirect", "requestRedirect": {}},
            ],
        }]}));
        assert_eq!(rule.matches[0].headers[0].value, ValueMatch::Exact("2".into()));
        assert_eq!(rule.matches[0].query_params[0].value, ValueMatch::Exact("1".into()));
        let Filter::RequestRedirect(r) = &rule.filters[0] else { panic!() };
        assert_eq!(r.status_code, 302);
        let rule = only_rule(json!({"rules": [{"filters": [
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 8080}}},
        ]}]}));
        let Filter::RequestMirror(m) = &rule.filters[0] else { panic!() };
        assert_eq!((m.backend.clone(), m.fraction), (target("shadow", 8080), Fraction::ALL), "everything mirrored");
    }

    #[test]
    fn every_supported_field_reads() {
        let rule = only_rule(json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
            "hostnames": ["api.shop"],
            "rules": [{
                "name": "canary",
                "matches": [{
                    "path": {"type": "PathPrefix", "value": "/v1/"},
                    "headers": [{"name": "X-Canary", "value": "yes"}, {"type": "RegularExpression", "name": "ua", "value": "curl/.*"}],
                    "queryParams": [{"type": "RegularExpression", "name": "id", "value": "[0-9]+"}],
                    "method": "POST",
                }],
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                        "set": [{"name": "x-a", "value": "1"}], "add": [{"name": "x-b", "value": "2"}], "remove": ["x-c"]}},
                    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-served-by", "value": "weft"}]}},
                    {"type": "URLRewrite", "urlRewrite": {"hostname": "api.internal", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
                    {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}, "percent": 10}},
                    {"type": "RequestMirror", "requestMirror": {"backendRef": {"group": "core", "kind": "Service", "name": "audit", "namespace": "shop", "port": 81}, "fraction": {"numerator": 1, "denominator": 3}}},
                ],
                "backendRefs": [
                    {"group": "", "kind": "Service", "name": "api-v1", "namespace": "shop", "port": 8080, "weight": 90},
                    {"name": "api-v2", "port": 8080, "weight": 10, "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-version", "value": "v2"}]}},
                    ]},
                ],
                "timeouts": {"request": "10s", "backendRequest": "2s500ms"},
                "retry": {"codes": [502, 503], "attempts": 3, "backoff": "100ms"},
            }],
        }));
        assert_eq!(rule.name.as_deref(), Some("canary"));
        let m = &rule.matches[0];
        assert_eq!(m.path, PathMatch::PathPrefix("/v1/".into()));
        assert_eq!(
            m.headers[1],
            HeaderMatch { name: "ua".into(), value: ValueMatch::RegularExpression("curl/.*".into()) }
        );
        assert_eq!(m.method, Some(Method::Post));
        assert_eq!(
            rule.filters[0],
            Filter::RequestHeaderModifier(HeaderModifier {
                set: vec![Header { name: "x-a".into(), value: "1".into() }],
                add: vec![Header { name: "x-b".into(), value: "2".into() }],
                remove: vec!["x-c".into()],
            })
        );
        assert_eq!(
            rule.filters[2],
            Filter::UrlRewrite(Rewrite {
                hostname: Some("api.internal".into()),
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            })
        );
        let Filter::RequestMirror(ten) = &rule.filters[3] else { panic!() };
        assert_eq!(ten.fraction, Fraction { numerator: 10, denominator: 100 });
        let Filter::RequestMirror(third) = &rule.filters[4] else { panic!() };
        assert_eq!(
            (third.backend.clone(), third.fraction),
            (target("audit", 81), Fraction { numerator: 1, denominator: 3 })
        );
        assert_eq!(rule.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [90, 10]);
        assert_eq!(rule.backends[1].filters.len(), 1);
        assert_eq!(
            rule.timeouts,
            Timeouts { request: Some(Duration::from_secs(10)), backend_request: Some(Duration::from_millis(2500)) }
        );
        assert_eq!(
            rule.retry,
            Some(Retry { codes: vec![502, 503], attempts: Some(3), backoff: Some(Duration::from_millis(100)) })
        );
        assert_eq!(rule.single_prefix(), Some("/v1/"));
        assert_eq!(
            rule.regexes(),
            [
                ("spec.rules[0].matches[0].headers[1].value".to_owned(), "curl/.*"),
                ("spec.rules[0].matches[0].queryParams[0].value".to_owned(), "[0-9]+"),
            ]
        );
    }

    #[test]
    fn a_rule_that_does_not_read_is_skipped_alone_with_its_field() {
        let good = json!({"matches": [{"path": {"value": "/ok"}}], "backendRefs": [{"name": "ok", "port": 80}]});
        let backend = |extra: Value| {
            let mut b = json!({"name": "api", "port": 80});
            b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            json!({"backendRefs": [b]})
        };
        let cases: Vec<(Value, &str, &str)> = vec![
            (
                json!({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}}, {"type": "Rewrite"}]}),
                "spec.rules[1].filters[1].type",
                "unknown filter type \"Rewrite\"",
            ),
            (json!({"filters": [{"type": "CORS", "cors": {}}]}), "spec.rules[1].filters[0].type", "not supported"),
            (
                json!({"filters": [{"type": "RequestHeaderModifier", "urlRewrite": {}}]}),
                "spec.rules[1].filters[0].urlRewrite",
                "takes requestHeaderModifier",
            ),
            (json!({"filters": [{"type": "URLRewrite"}]}), "spec.rules[1].filters[0].urlRewrite", "needs urlRewrite"),
            (
                backend(json!({"weight": 1_000_001})),
                "spec.rules[1].backendRefs[0].weight",
                "1000001 is out of range (0 to 1000000)",
            ),
            (backend(json!({"weight": -1})), "spec.rules[1].backendRefs[0].weight", "out of range"),
            (backend(json!({"weight": "10"})), "spec.rules[1].backendRefs[0].weight", "expected a whole number"),
            (backend(json!({"kind": "ServiceImport"})), "spec.rules[1].backendRefs[0].kind", "only Services"),
            (
                backend(json!({"group": "multicluster.x-k8s.io"})),
                "spec.rules[1].backendRefs[0].group",
                "only core Services",
            ),
            (backend(json!({"namespace": "other"})), "spec.rules[1].backendRefs[0].namespace", "ReferenceGrant"),
            (json!({"backendRefs": [{"name": "api"}]}), "spec.rules[1].backendRefs[0].port", "needs a port"),
            (backend(json!({"name": "API"})), "spec.rules[1].backendRefs[0].name", "not a Service name"),
            (backend(json!({"colour": "red"})), "spec.rules[1].backendRefs[0].colour", "unknown field"),
            (json!({"timeouts": {"request": "10 s"}}), "spec.rules[1].timeouts.request", "not a duration"),
            (json!({"timeouts": {"request": "1d"}}), "spec.rules[1].timeouts.request", "not a duration"),
            (
                json!({"timeouts": {"backendRequest": "123456s"}}),
                "spec.rules[1].timeouts.backendRequest",
                "not a duration",
            ),
            (
                json!({"timeouts": {"request": "1s", "backendRequest": "2s"}}),
                "spec.rules[1].timeouts.backendRequest",
                "longer than the request timeout 1s",
            ),
            (
                json!({"retry": {"codes": [503, 600]}}),
                "spec.rules[1].retry.codes[1]",
                "600 is out of range (400 to 599)",
            ),
            (json!({"retry": {"codes": [399]}}), "spec.rules[1].retry.codes[0]", "out of range"),
            (json!({"retry": {"attempts": -1}}), "spec.rules[1].retry.attempts", "out of range"),
            (json!({"retry": {"backoff": "fast"}}), "spec.rules[1].retry.backoff", "not a duration"),
            (
                json!({"matches": [{"path": {"value": "foo"}}]}),
                "spec.rules[1].matches[0].path.value",
                "does not start with '/'",
            ),
            (
                json!({"matches": [{"path": {"type": "Exact", "value": "/a//b"}}]}),
                "spec.rules[1].matches[0].path.value",
                "contains \"//\"",
            ),
            (json!({"matches": [{"path": {"value": "/a b"}}]}), "spec.rules[1].matches[0].path.value", "escape it"),
            (
                json!({"matches": [{"path": {"type": "Glob", "value": "/a"}}]}),
                "spec.rules[1].matches[0].path.type",
                "not a path match type",
            ),
            (json!({"matches": [{"method": "FETCH"}]}), "spec.rules[1].matches[0].method", "not a method"),
            (
                json!({"matches": [{"headers": [{"name": "bad header", "value": "x"}]}]}),
                "spec.rules[1].matches[0].headers[0].name",
                "not a header name",
            ),
            (
                json!({"matches": [{"queryParams": [{"name": "q", "value": ""}]}]}),
                "spec.rules[1].matches[0].queryParams[0].value",
                "1 to 1024",
            ),
            (json!({"sessionPersistence": {}}), "spec.rules[1].sessionPersistence", "not supported"),
            (json!({"matchs": []}), "spec.rules[1].matchs", "unknown field"),
            (
                json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {}}], "backendRefs": [{"name": "a", "port": 80}]}),
                "spec.rules[1].filters[0].type",
                "cannot be used in a rule with backendRefs",
            ),
            (
                backend(json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {}}]})),
                "spec.rules[1].backendRefs[0].filters[0].type",
                "cannot apply to one backend",
            ),
            (
                json!({"filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
                ]}),
                "spec.rules[1].filters[1].type",
                "cannot be repeated",
            ),
            (
                json!({"filters": [
                    {"type": "URLRewrite", "urlRewrite": {}},
                    {"type": "RequestRedirect", "requestRedirect": {}},
                ]}),
                "spec.rules[1].filters[1].type",
                "cannot be combined",
            ),
            (
                json!({"matches": [{"path": {"type": "Exact", "value": "/a"}}], "filters": [
                    {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}},
                ]}),
                "spec.rules[1].filters[0].urlRewrite.path.type",
                "exactly one match, of type PathPrefix",
            ),
            (
                json!({"matches": [{"path": {"value": "/a"}}, {"path": {"value": "/b"}}], "filters": [
                    {"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/c"}}},
                ]}),
                "spec.rules[1].filters[0].requestRedirect.path.type",
                "exactly one match",
            ),
            (
                json!({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replacePrefixMatch": "/c"}}}]}),
                "spec.rules[1].filters[0].urlRewrite.path.replacePrefixMatch",
                "set replaceFullPath only",
            ),
            (
                json!({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "c"}}}]}),
                "spec.rules[1].filters[0].urlRewrite.path.replaceFullPath",
                "does not start with '/'",
            ),
            (
                json!({"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "Api_Host"}}]}),
                "spec.rules[1].filters[0].urlRewrite.hostname",
                "not a hostname",
            ),
            (
                json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]}),
                "spec.rules[1].filters[0].requestRedirect.statusCode",
                "not a redirect status",
            ),
            (
                json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "ftp"}}]}),
                "spec.rules[1].filters[0].requestRedirect.scheme",
                "not a scheme",
            ),
            (
                json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"port": 0}}]}),
                "spec.rules[1].filters[0].requestRedirect.port",
                "out of range (1 to 65535)",
            ),
            (
                json!({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "X-A", "value": "1"}], "remove": ["x-a"]}}]}),
                "spec.rules[1].filters[0].requestHeaderModifier.remove[0]",
                "already has an action (spec.rules[1].filters[0].requestHeaderModifier.set[0].name)",
            ),
            (
                json!({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "add": [{"name": "x-a", "value": "a\nb"}]}}]}),
                "spec.rules[1].filters[0].requestHeaderModifier.add[0].value",
                "printable ASCII",
            ),
            (
                json!({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 80}, "percent": 5, "fraction": {"numerator": 1}}}]}),
                "spec.rules[1].filters[0].requestMirror.fraction",
                "not both",
            ),
            (
                json!({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 80}, "fraction": {"numerator": 3, "denominator": 2}}}]}),
                "spec.rules[1].filters[0].requestMirror.fraction.numerator",
                "more than the denominator",
            ),
            (
                json!({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 80}, "percent": 101}}]}),
                "spec.rules[1].filters[0].requestMirror.percent",
                "out of range (0 to 100)",
            ),
            (
                json!({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "namespace": "x", "port": 80}}}]}),
                "spec.rules[1].filters[0].requestMirror.backendRef.namespace",
                "ReferenceGrant",
            ),
            (json!("not a rule"), "spec.rules[1]", "expected an object, found \"not a rule\""),
        ];
        for (bad_rule, field, why) in cases {
            let spec = json!({"rules": [good, bad_rule, good]});
            let parsed = parse("shop", &spec);
            assert!(parsed.rules[0].is_some() && parsed.rules[2].is_some(), "{bad_rule}: the other rules stay");
            assert!(parsed.rules[1].is_none(), "{bad_rule}: skipped");
            let [problem] = parsed.problems.as_slice() else { panic!("{bad_rule}: {:?}", parsed.problems) };
            assert_eq!(problem.field, field, "{bad_rule}: {problem}");
            assert!(problem.reason.contains(why), "{bad_rule}: {problem}");
            assert_eq!(problem.rule, Some(1));
        }
    }

    #[test]
    fn what_is_allowed_at_the_edges_reads() {
        for weight in [0, MAX_WEIGHT] {
            let rule = only_rule(json!({"rules": [{"backendRefs": [{"name": "a", "port": 80, "weight": weight}]}]}));
            assert_eq!(rule.backends[0].weight, weight);
        }
        let rule = only_rule(json!({"rules": [{"retry": {"codes": [400, 599], "attempts": 0}}]}));
        assert_eq!(rule.retry.as_ref().map(|r| (r.codes.clone(), r.attempts)), Some((vec![400, 599], Some(0))));
        // "0s" is no timeout; a backend timeout may exceed a request timeout of 0s (none).
        let rule = only_rule(json!({"rules": [{"timeouts": {"request": "0s", "backendRequest": "1h"}}]}));
        assert_eq!(rule.timeouts, Timeouts { request: None, backend_request: Some(Duration::from_secs(3600)) });
        let rule = only_rule(json!({"rules": [{"timeouts": {"request": "1s", "backendRequest": "1000ms"}}]}));
        assert_eq!(rule.timeouts.backend_request, Some(Duration::from_secs(1)), "equal is allowed");
        // An empty prefix replacement, a header name any case, a redirect to https.
        let rule = only_rule(json!({"rules": [{"filters": [
            {"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "port": 8443, "statusCode": 308,
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": ""}}},
        ]}]}));
        assert_eq!(
            rule.filters[0],
            Filter::RequestRedirect(Redirect {
                scheme: Some(Scheme::Https),
                hostname: None,
                path: Some(PathModifier::ReplacePrefixMatch(String::new())),
                port: Some(8443),
                status_code: 308,
            })
        );
        let rule =
            only_rule(json!({"rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/a+(b|c)"}}]}]}));
        assert_eq!(rule.matches[0].path, PathMatch::RegularExpression("/a+(b|c)".into()), "not checked as a path");
        // YAML's `key:` with no value is absent.
        let rule = only_rule(
            json!({"rules": [{"matches": null, "filters": null, "backendRefs": [{"name": "a", "port": 80, "weight": null}]}]}),
        );
        assert_eq!(rule.backends[0].weight, 1);
    }

    #[test]
    fn problems_outside_rules_skip_nothing() {
        let parsed = parse("shop", &json!({"hostnames": ["a"], "rulez": [], "rules": [{}]}));
        assert_eq!(parsed.rules.len(), 1);
        assert!(parsed.rules[0].is_some());
        assert_eq!(
            parsed.problems,
            [Problem { field: "spec.rulez".into(), reason: unknown_field(SPEC_FIELDS), rule: None }]
        );

        let parsed = parse("shop", &json!({"rules": {"a": 1}}));
        assert!(parsed.rules.is_empty());
        assert_eq!(parsed.problems[0].field, "spec.rules");
        let parsed = parse("shop", &json!([1]));
        assert!(parsed.rules.is_empty());
        assert_eq!(parsed.problems[0].to_string(), "spec: expected an object, found a list");
    }

    #[test]
    fn durations_are_gateway_api_durations() {
        let ok = [
            ("0s", Duration::ZERO),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("1m1ms", Duration::from_millis(60_001)),
            ("99999s", Duration::from_secs(99_999)),
            ("1h1m1s1ms", Duration::from_millis(3_661_001)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Some(want), "{text}");
        }
        for text in ["", "1", "s", "100000s", "1.5s", "1h1m1s1ms1s", "1d", "-1s", "1 s", "1S", "1us", "1msx"] {
            assert_eq!(parse_duration(text), None, "{text:?}");
        }
    }

    #[test]
    fn regexes_a_checker_refuses_skip_their_rule() {
        let spec = json!({"rules": [
            {"matches": [{"path": {"type": "RegularExpression", "value": "/ok.*"}}]},
            {"matches": [{"path": {"value": "/a"}}, {"headers": [{"type": "RegularExpression", "name": "x", "value": "(unclosed"}]}]},
            {"matches": [{"path": {"value": "/plain"}}]},
        ]});
        let mut parsed = parse("shop", &spec);
        let mut seen = Vec::new();
        parsed.check_regexes(|p| {
            seen.push(p.to_owned());
            if p.contains('(') && !p.contains(')') { Err("unclosed group".to_owned()) } else { Ok(()) }
        });
        assert_eq!(seen, ["/ok.*", "(unclosed"]);
        assert!(parsed.rules[0].is_some() && parsed.rules[1].is_none() && parsed.rules[2].is_some());
        assert_eq!(
            parsed.problems,
            [Problem {
                field: "spec.rules[1].matches[1].headers[0].value".into(),
                reason: "unclosed group".into(),
                rule: Some(1)
            }]
        );
    }
}
