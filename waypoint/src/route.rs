//! The compiled `HTTPRoute`s of one service: which rule a request matches, which backend it
//! goes to, what the rule's filters do to it, and its retry and timeout policy. Pure logic,
//! no I/O: the proxy asks, this answers.
//!
//! ```text
//!  HttpRoute specs ──meshapi::httproute::parse──► rules (bad ones skipped, with a Problem)
//!   of the service      + regexes compiled here
//!                  ──RouteTable::compile──► one table per service, every (rule, match) ranked once:
//!                                             exact paths  HashMap path ─► candidates, in rank order
//!                                             prefixes     longest first, then the other keys
//!                                             regexes      after every prefix
//!  a request ──RouteTable::find(method, uri, headers)──► the first candidate that matches, or
//!                                                         None (the proxy answers 404)
//!            ──Rule::redirect / apply_request_filters / pick_backend(random) / policy──► the proxy
//! ```
//!
//! **Precedence**, across all rules of all routes of the service (Gateway API): an `Exact`
//! path beats any `PathPrefix`; a longer prefix beats a shorter one (a trailing `/` does not
//! count); a `RegularExpression` path ranks after every prefix (the Gateway API leaves its rank
//! to the implementation); then a match with a method beats one without; then more header
//! matches win; then more query parameter matches. Remaining ties go to the route first by
//! `<namespace>/<name>` (the Gateway API puts the oldest route first, but the model carries no
//! creation time), then to the first rule of the route, then to its first match.
//!
//! **Matching**: a prefix matches whole segments (`/foo` matches `/foo`, `/foo/`, `/foo/bar`,
//! not `/foobar`). Paths are compared as the request wrote them (not percent-decoded, not
//! normalized). Header names are case-insensitive and values exact; a header sent several
//! times matches when one of its values does. A query parameter is read at its first
//! occurrence, name and value percent-decoded. Of several header (or query) matches with
//! equivalent names, only the first counts, as the Gateway API requires. Regular expressions
//! are the `regex` crate's syntax and must match the whole value.
//!
//! **No route, no rule**: a service without routes (or whose routes have no rule left after
//! the bad ones are skipped: a route that cannot be accepted does not apply) gets one rule that
//! sends everything to the service itself, at the port the request was addressed to.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, LOCATION};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use meshapi::httproute::{self, Fraction, PathMatch, PathModifier, Scheme, ValueMatch};
use meshapi::{HttpRoute, Service};
use regex::{Regex, RegexBuilder};

/// Retries after the first attempt when a route's `retry` does not say: one steps over a
/// failed endpoint; more multiply the load on a backend that is already failing.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// The base interval between attempts when a route's `retry` does not say (Envoy's default
/// too): long enough for a connection refused to become another endpoint, short enough not to
/// be noticed.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// The longest wait between attempts, as a multiple of the base interval: exponential growth
/// stops there (Envoy's default cap).
pub const MAX_BACKOFF_FACTOR: u32 = 10;

/// The rules of one service's routes, ranked for matching.
#[derive(Debug)]
pub struct RouteTable {
    rules: Vec<Arc<Rule>>,
    /// Candidates with an `Exact` path, by that path, each list in rank order. They all rank
    /// before any prefix, so one lookup replaces a scan.
    exact: HashMap<Box<str>, Vec<Candidate>>,
    /// `PathPrefix` candidates in rank order.
    prefixes: Vec<Candidate>,
    /// `RegularExpression` path candidates in rank order, after every prefix.
    regexes: Vec<Candidate>,
}

/// One rule of the table: what it does to a request it matched, and where it sends it.
#[derive(Debug)]
pub struct Rule {
    /// `<namespace>/<name>` of its route; none for the default rule of a service without
    /// routes.
    pub route: Option<Arc<str>>,
    /// Its index in the route's `spec.rules`.
    pub index: usize,
    /// The rule's filters, in order.
    pub filters: Vec<Filter>,
    /// Empty when the rule has none: requests are answered 500, unless it redirects.
    pub backends: Vec<Backend>,
    /// Timeouts and retries, ready for the proxy.
    pub policy: Policy,
    /// Running sums of the backends' weights, for [`Rule::pick_backend`].
    cumulative: Vec<u64>,
    /// The rule's one `PathPrefix` match, when it has exactly one match: the prefix a
    /// `ReplacePrefixMatch` replaces.
    prefix: Option<Box<str>>,
}

/// Where a rule sends a request.
#[derive(Debug)]
pub struct Backend {
    /// `<namespace>/<name>` of the Service.
    pub service: Arc<str>,
    /// The Service port; none for the default rule: the port the request was addressed to.
    pub port: Option<u16>,
    pub weight: u32,
    /// Applied after the rule's, only to requests sent to this backend; never a redirect.
    pub filters: Vec<Filter>,
    /// As [`Rule`]'s, for this backend's `ReplacePrefixMatch`.
    prefix: Option<Box<str>>,
}

/// A rule's timeouts and retries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// The whole exchange, retries included; none: no limit.
    pub request_timeout: Option<Duration>,
    /// Each attempt; none: no limit of its own.
    pub backend_timeout: Option<Duration>,
    /// None without a `retry` stanza.
    pub retry: Option<RetryPolicy>,
}

/// When and how often to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables them.
    pub attempts: u32,
    /// Statuses retried; failures to connect are retried whatever they are.
    pub codes: Vec<StatusCode>,
    /// The wait before the first retry; it doubles for each next one, up to
    /// [`MAX_BACKOFF_FACTOR`] times.
    pub backoff: Duration,
}

/// A filter, compiled: header names and values parsed once.
#[derive(Debug)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

#[derive(Debug, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

#[derive(Debug)]
pub struct Redirect {
    scheme: Option<Scheme>,
    hostname: Option<Box<str>>,
    path: Option<PathModifier>,
    port: Option<u16>,
    status: StatusCode,
}

/// A redirect's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirection {
    pub status: StatusCode,
    pub location: HeaderValue,
}

#[derive(Debug)]
pub struct Rewrite {
    hostname: Option<(Authority, HeaderValue)>,
    path: Option<PathModifier>,
}

/// Copies a share of requests to another service.
#[derive(Debug)]
pub struct Mirror {
    /// `<namespace>/<name>` of the Service.
    pub service: Arc<str>,
    pub port: u16,
    fraction: Fraction,
}

/// A rule skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `<namespace>/<name>` of the route.
    pub route: Arc<str>,
    /// The field at fault, from the route's `spec`.
    pub field: String,
    pub reason: String,
}

/// Why a filter could not be applied to a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("the request names no host (no Host header, no authority), so a redirect has none to keep")]
    NoHost,
    #[error("the path {0:?} that the route's filter makes is not a valid URI path")]
    BadPath(String),
    #[error("the redirect location {0:?} is not a valid header value")]
    BadLocation(String),
    #[error("ReplacePrefixMatch on a rule without a single PathPrefix match, or a path it does not match")]
    NoPrefix,
}

impl RouteTable {
    /// The table of `service`, from the routes attached to it (the caller picks them by
    /// [`HttpRoute::parents`]), and every rule skipped on the way.
    pub fn compile(service: &Service, routes: &[&HttpRoute]) -> (RouteTable, Vec<Problem>) {
        let mut routes: Vec<&HttpRoute> = routes.to_vec();
        routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut problems = Vec::new();
        let mut rules: Vec<Arc<Rule>> = Vec::new();
        let mut ranked: Vec<(Rank, Candidate)> = Vec::new();
        for route in routes {
            let key: Arc<str> = Arc::from(format!("{}/{}", route.namespace, route.name));
            let parsed = httproute::parse(&route.namespace, &route.spec);
            let problem = |p: httproute::Problem| Problem { route: key.clone(), field: p.field, reason: p.reason };
            problems.extend(parsed.problems.into_iter().map(problem));
            for spec_rule in parsed.rules.into_iter().flatten() {
                match compile_rule(&key, &spec_rule) {
                    Ok((rule, candidates)) => {
                        let at = rules.len();
                        for (rank, mut candidate) in candidates {
                            candidate.rule = at;
                            ranked.push((rank, candidate));
                        }
                        rules.push(Arc::new(rule));
                    }
                    Err(p) => problems.push(problem(p)),
                }
            }
        }
        if rules.is_empty() {
            let (rule, candidate) = default_rule(service);
            rules.push(Arc::new(rule));
            ranked.push((Rank::everything(), candidate));
        }
        ranked.sort_by(|(a, _), (b, _)| a.cmp(b));

        let mut table = RouteTable { rules, exact: HashMap::new(), prefixes: Vec::new(), regexes: Vec::new() };
        for (_, candidate) in ranked {
            match &candidate.path {
                PathCondition::Exact(path) => table.exact.entry(path.clone()).or_default().push(candidate),
                PathCondition::Prefix(_) => table.prefixes.push(candidate),
                PathCondition::Regex(_) => table.regexes.push(candidate),
            }
        }
        (table, problems)
    }

    /// The rule for a request, by the precedence of the module's documentation; none when no
    /// rule matches (the Gateway API's answer is 404). No allocation: candidates are ranked at
    /// compile time (a query value is decoded into a new string only when a regular
    /// expression must read it and it holds a `%` escape).
    pub fn find(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<&Arc<Rule>> {
        let path = match uri.path() {
            "" => "/",
            path => path,
        };
        let query = uri.query();
        let exact = self.exact.get(path).map(Vec::as_slice).unwrap_or_default();
        exact
            .iter()
            .chain(&self.prefixes)
            .chain(&self.regexes)
            .find(|c| c.path.matches(path) && c.matches_rest(method, headers, query))
            .map(|c| &self.rules[c.rule])
    }

    /// Every rule, in no particular order.
    pub fn rules(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules.iter()
    }
}

impl Rule {
    /// A backend, by weight: `random` is uniform over `u32` (the caller's, so tests are
    /// deterministic). None when the rule has no backend or every weight is 0: the Gateway API
    /// answers 500.
    pub fn pick_backend(&self, random: u32) -> Option<&Backend> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        // In [0, total): the share of the u32 range `random` falls in, scaled.
        let point = ((u128::from(random) * u128::from(total)) >> 32) as u64;
        let i = self.cumulative.partition_point(|&sum| sum <= point);
        self.backends.get(i)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The rule's `PathPrefix` value, when it has exactly one match and that is a prefix.
    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// The rule's redirect, if it has one, for a request addressed to service port `port`.
    pub fn redirect(&self, parts: &Parts, port: u16) -> Option<Result<Redirection, FilterError>> {
        self.filters.iter().find_map(|f| match f {
            Filter::Redirect(r) => Some(r.respond(parts, port, self.prefix())),
            _ => None,
        })
    }

    /// The rule's request header changes and URL rewrite, in order.
    pub fn apply_request_filters(&self, parts: &mut Parts) -> Result<(), FilterError> {
        apply_request(&self.filters, parts, self.prefix())
    }

    /// The rule's response header changes.
    pub fn apply_response_filters(&self, headers: &mut HeaderMap) {
        apply_response(&self.filters, headers);
    }

    /// The rule's mirrors this request is copied to; `random` is called once per mirror.
    pub fn mirrors<'a>(&'a self, random: impl FnMut() -> u32 + 'a) -> impl Iterator<Item = &'a Mirror> + 'a {
        sampled(&self.filters, random)
    }
}

impl Backend {
    /// The Service and the port to send to, for a request addressed to `requested_port`.
    pub fn destination(&self, requested_port: u16) -> (&Arc<str>, u16) {
        (&self.service, self.port.unwrap_or(requested_port))
    }

    /// This backend's request filters, after the rule's.
    pub fn apply_request_filters(&self, parts: &mut Parts) -> Result<(), FilterError> {
        apply_request(&self.filters, parts, self.prefix.as_deref())
    }

    /// This backend's response filters.
    pub fn apply_response_filters(&self, headers: &mut HeaderMap) {
        apply_response(&self.filters, headers);
    }

    /// This backend's mirrors this request is copied to.
    pub fn mirrors<'a>(&'a self, random: impl FnMut() -> u32 + 'a) -> impl Iterator<Item = &'a Mirror> + 'a {
        sampled(&self.filters, random)
    }
}

impl RetryPolicy {
    fn from_spec(retry: &httproute::Retry) -> RetryPolicy {
        RetryPolicy {
            attempts: retry.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            // 400 to 599 by the parse: always a status.
            codes: retry.codes.iter().filter_map(|c| StatusCode::from_u16(*c).ok()).collect(),
            backoff: retry.backoff.unwrap_or(DEFAULT_RETRY_BACKOFF),
        }
    }

    /// Whether a response with `status` is retried.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        self.codes.contains(&status)
    }

    /// The wait before retry number `retry` (1 for the first): the base interval, doubled for
    /// each retry before it, at most [`MAX_BACKOFF_FACTOR`] times the base.
    pub fn backoff_for(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        let factor = (1u32 << doublings).min(MAX_BACKOFF_FACTOR);
        self.backoff.saturating_mul(factor)
    }
}

impl HeaderModifier {
    /// `set` replaces, `add` appends, `remove` removes (one action per name, so in any order).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

impl Redirect {
    /// The redirection for a request addressed to service port `port`; `prefix` is the rule's
    /// `PathPrefix` match, for `ReplacePrefixMatch`. Unset parts keep the request's: its
    /// scheme (`http` when it has none, as inside the mesh), its host, its path and query. The
    /// port is the filter's, else the scheme's well-known port when the filter sets a scheme,
    /// else `port`; it is left out of the location when it is the scheme's default.
    pub fn respond(&self, parts: &Parts, port: u16, prefix: Option<&str>) -> Result<Redirection, FilterError> {
        let scheme = match self.scheme {
            Some(Scheme::Http) => "http",
            Some(Scheme::Https) => "https",
            None => parts.uri.scheme_str().unwrap_or("http"),
        };
        let host = match &self.hostname {
            Some(h) => h,
            None => request_host(parts).ok_or(FilterError::NoHost)?,
        };
        let port = self.port.unwrap_or(match self.scheme {
            Some(Scheme::Http) => 80,
            Some(Scheme::Https) => 443,
            None => port,
        });
        let path = modified_path(parts.uri.path(), self.path.as_ref(), prefix)?;
        let mut location = format!("{scheme}://{host}");
        if !matches!((scheme, port), ("http", 80) | ("https", 443)) {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(query) = parts.uri.query() {
            location.push('?');
            location.push_str(query);
        }
        let location = HeaderValue::from_str(&location).map_err(|_| FilterError::BadLocation(location))?;
        Ok(Redirection { status: self.status, location })
    }
}

impl Redirection {
    /// The answer, without a body.
    pub fn into_response(self) -> http::Response<()> {
        let mut response = http::Response::new(());
        *response.status_mut() = self.status;
        response.headers_mut().insert(LOCATION, self.location);
        response
    }
}

impl Rewrite {
    /// Replaces the host (the `Host` header, and the authority when the request has one) and
    /// the path (the query is kept); `prefix` as for [`Redirect::respond`].
    pub fn apply(&self, parts: &mut Parts, prefix: Option<&str>) -> Result<(), FilterError> {
        let path_and_query = match &self.path {
            None => None,
            Some(modifier) => {
                let path = modified_path(parts.uri.path(), Some(modifier), prefix)?;
                let text = match parts.uri.query() {
                    Some(query) => format!("{path}?{query}"),
                    None => path.into_owned(),
                };
                Some(PathAndQuery::try_from(text.as_str()).map_err(|_| FilterError::BadPath(text))?)
            }
        };
        let authority = match &self.hostname {
            Some((authority, value)) => {
                parts.headers.insert(HOST, value.clone());
                parts.uri.authority().map(|_| authority.clone())
            }
            None => None,
        };
        if path_and_query.is_some() || authority.is_some() {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            if let Some(pq) = path_and_query {
                uri.path_and_query = Some(pq);
            }
            if let Some(a) = authority {
                uri.authority = Some(a);
            }
            // Scheme and authority were valid together before; a path alone is an origin form.
            parts.uri = Uri::from_parts(uri).map_err(|e| FilterError::BadPath(e.to_string()))?;
        }
        Ok(())
    }
}

impl Mirror {
    /// Whether this request is copied, given `random` uniform over `u32`.
    pub fn sample(&self, random: u32) -> bool {
        let Fraction { numerator, denominator } = self.fraction;
        // (random / 2^32) < numerator / denominator, in integers.
        u64::from(random) * u64::from(denominator) < u64::from(numerator) << 32
    }

    /// The Service and port copies go to.
    pub fn destination(&self) -> (&Arc<str>, u16) {
        (&self.service, self.port)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTPRoute {}: {}: {}", self.route, self.field, self.reason)
    }
}

/// The path `modifier` makes of `path`; `path` itself without one.
fn modified_path<'a>(
    path: &'a str,
    modifier: Option<&'a PathModifier>,
    prefix: Option<&str>,
) -> Result<Cow<'a, str>, FilterError> {
    match modifier {
        None => Ok(Cow::Borrowed(path)),
        Some(PathModifier::ReplaceFullPath(full)) => Ok(Cow::Borrowed(full)),
        Some(PathModifier::ReplacePrefixMatch(replacement)) => {
            let prefix = prefix.ok_or(FilterError::NoPrefix)?;
            replace_prefix(path, prefix, replacement).map(Cow::Owned).ok_or(FilterError::NoPrefix)
        }
    }
}

/// `path` with the whole segments `prefix` matched replaced by `replacement`, as the Gateway
/// API's table says (`/foo/bar`, prefix `/foo`, `/xyz` → `/xyz/bar`; `/foo`, `/foo`, `` →
/// `/`); none when `prefix` does not match `path`.
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> Option<String> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix).filter(|rest| rest.is_empty() || rest.starts_with('/'))?;
    let replacement = replacement.trim_end_matches('/');
    let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
    if !replacement.starts_with('/') && !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(replacement);
    out.push_str(rest);
    Some(out)
}

/// The request's host without its port: the authority's, else the `Host` header's.
fn request_host(parts: &Parts) -> Option<&str> {
    let host = match parts.uri.host() {
        Some(host) => host,
        None => {
            let value = parts.headers.get(HOST)?.to_str().ok()?;
            match value.strip_prefix('[') {
                // An IPv6 literal keeps its brackets.
                Some(v6) => &value[..v6.find(']')? + 2],
                None => value.rsplit_once(':').map_or(value, |(host, _)| host),
            }
        }
    };
    (!host.is_empty()).then_some(host)
}

fn apply_request(filters: &[Filter], parts: &mut Parts, prefix: Option<&str>) -> Result<(), FilterError> {
    for filter in filters {
        match filter {
            Filter::RequestHeaders(m) => m.apply(&mut parts.headers),
            Filter::Rewrite(r) => r.apply(parts, prefix)?,
            Filter::ResponseHeaders(_) | Filter::Redirect(_) | Filter::Mirror(_) => {}
        }
    }
    Ok(())
}

fn apply_response(filters: &[Filter], headers: &mut HeaderMap) {
    for filter in filters {
        if let Filter::ResponseHeaders(m) = filter {
            m.apply(headers);
        }
    }
}

fn sampled<'a>(filters: &'a [Filter], mut random: impl FnMut() -> u32 + 'a) -> impl Iterator<Item = &'a Mirror> + 'a {
    filters.iter().filter_map(move |f| match f {
        Filter::Mirror(m) if m.sample(random()) => Some(m),
        _ => None,
    })
}

// Compilation.

/// One match of one rule, compiled.
#[derive(Debug)]
struct Candidate {
    /// Index in `RouteTable::rules`.
    rule: usize,
    path: PathCondition,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueCondition)>,
    query: Vec<(Box<str>, ValueCondition)>,
}

#[derive(Debug)]
enum PathCondition {
    Exact(Box<str>),
    /// Without its trailing `/` (`/` itself is the empty prefix: every path).
    Prefix(Box<str>),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueCondition {
    Exact(Box<str>),
    Regex(Regex),
}

/// Where a candidate ranks: smaller first. Field order is the precedence order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// 0 exact, 1 prefix, 2 regular expression.
    class: u8,
    prefix_len: Reverse<usize>,
    has_method: Reverse<bool>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    route: Arc<str>,
    rule: usize,
    matched: usize,
}

impl Rank {
    fn everything() -> Rank {
        Rank {
            class: 1,
            prefix_len: Reverse(0),
            has_method: Reverse(false),
            headers: Reverse(0),
            query: Reverse(0),
            route: Arc::from(""),
            rule: 0,
            matched: 0,
        }
    }
}

impl PathCondition {
    fn matches(&self, path: &str) -> bool {
        match self {
            // Looked up by path: only candidates of this very path are asked.
            PathCondition::Exact(exact) => **exact == *path,
            PathCondition::Prefix(prefix) => {
                path.strip_prefix(&**prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathCondition::Regex(regex) => regex.is_match(path),
        }
    }
}

impl Candidate {
    /// Everything but the path.
    fn matches_rest(&self, method: &Method, headers: &HeaderMap, query: Option<&str>) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.iter().all(|(name, condition)| {
                headers.get_all(name).iter().any(|value| match condition {
                    ValueCondition::Exact(want) => value.as_bytes() == want.as_bytes(),
                    ValueCondition::Regex(regex) => {
                        std::str::from_utf8(value.as_bytes()).is_ok_and(|v| regex.is_match(v))
                    }
                })
            })
            && self.query.iter().all(|(name, condition)| {
                query_value(query.unwrap_or(""), name).is_some_and(|raw| match condition {
                    ValueCondition::Exact(want) => decoded_eq(raw, want),
                    ValueCondition::Regex(regex) => percent_decoded(raw).is_some_and(|v| regex.is_match(&v)),
                })
            })
    }
}

/// The raw value of the first parameter named `name` (compared percent-decoded).
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        decoded_eq(key, name).then_some(value)
    })
}

/// Whether `raw`, percent-decoded, is `want`, without decoding into a new string.
fn decoded_eq(raw: &str, want: &str) -> bool {
    let mut want = want.bytes();
    let raw = raw.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        let byte = match (raw[i], hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                i += 3;
                hi << 4 | lo
            }
            (b, _, _) => {
                i += 1;
                b
            }
        };
        if want.next() != Some(byte) {
            return false;
        }
    }
    want.next().is_none()
}

/// `raw` percent-decoded; borrowed when it holds no escape; none when it is not UTF-8 once
/// decoded.
fn percent_decoded(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.contains('%') {
        return Some(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex(byte: Option<&u8>) -> Option<u8> {
    let b = *byte?;
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A pattern the whole text must match, within [`httproute::REGEX_SIZE_LIMIT`].
fn full_match(pattern: &str) -> Result<Regex, String> {
    let limited = |p: &str| RegexBuilder::new(p).size_limit(httproute::REGEX_SIZE_LIMIT).build();
    // Checked alone first, so that the anchors below wrap exactly the pattern (`a)|(b` would
    // otherwise close the group early and leave an unanchored branch).
    limited(pattern).map_err(|e| format!("not a regular expression: {e}"))?;
    limited(&format!("^(?:{pattern})$")).map_err(|e| format!("not a regular expression: {e}"))
}

fn compile_rule(
    route: &Arc<str>,
    spec: &httproute::Rule,
) -> Result<(Rule, Vec<(Rank, Candidate)>), httproute::Problem> {
    let fail = |field: String, reason: String| httproute::Problem { field, reason, rule: Some(spec.index) };
    // Regexes first, by the field the parse names them with.
    let mut compiled: HashMap<String, Regex> = HashMap::new();
    for (field, pattern) in spec.regexes() {
        let regex = full_match(pattern).map_err(|why| fail(field.clone(), why))?;
        compiled.insert(field, regex);
    }
    let at = |j: usize| format!("spec.rules[{}].matches[{j}]", spec.index);
    let mut candidates = Vec::with_capacity(spec.matches.len());
    for (j, m) in spec.matches.iter().enumerate() {
        let mut take = |field: String| compiled.remove(&field).ok_or_else(|| fail(field, "regex not compiled".into()));
        let (class, prefix_len, path) = match &m.path {
            PathMatch::Exact(p) => (0, 0, PathCondition::Exact(p.as_str().into())),
            PathMatch::PathPrefix(p) => {
                let trimmed = p.trim_end_matches('/');
                (1, trimmed.len(), PathCondition::Prefix(trimmed.into()))
            }
            PathMatch::RegularExpression(_) => (2, 0, PathCondition::Regex(take(format!("{}.path.value", at(j)))?)),
        };
        let mut headers: Vec<(HeaderName, ValueCondition)> = Vec::new();
        for (k, h) in m.headers.iter().enumerate() {
            let field = format!("{}.headers[{k}]", at(j));
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| fail(format!("{field}.name"), format!("{:?} is not a header name", h.name)))?;
            let condition = match &h.value {
                ValueMatch::Exact(v) => ValueCondition::Exact(v.as_str().into()),
                ValueMatch::RegularExpression(_) => ValueCondition::Regex(take(format!("{field}.value"))?),
            };
            // Of equivalent names only the first counts (Gateway API).
            if !headers.iter().any(|(n, _)| *n == name) {
                headers.push((name, condition));
            }
        }
        let mut query: Vec<(Box<str>, ValueCondition)> = Vec::new();
        for (k, q) in m.query_params.iter().enumerate() {
            let condition = match &q.value {
                ValueMatch::Exact(v) => ValueCondition::Exact(v.as_str().into()),
                ValueMatch::RegularExpression(_) => {
                    ValueCondition::Regex(take(format!("{}.queryParams[{k}].value", at(j)))?)
                }
            };
            if !query.iter().any(|(n, _)| **n == *q.name) {
                query.push((q.name.as_str().into(), condition));
            }
        }
        let method = m.method.map(http_method);
        let rank = Rank {
            class,
            prefix_len: Reverse(prefix_len),
            has_method: Reverse(method.is_some()),
            headers: Reverse(headers.len()),
            query: Reverse(query.len()),
            route: route.clone(),
            rule: spec.index,
            matched: j,
        };
        candidates.push((rank, Candidate { rule: 0, path, method, headers, query }));
    }

    let prefix: Option<Box<str>> = spec.single_prefix().map(Into::into);
    let filters = compile_filters(&spec.filters, &format!("spec.rules[{}].filters", spec.index))
        .map_err(|(field, reason)| fail(field, reason))?;
    let mut backends = Vec::with_capacity(spec.backends.len());
    for (j, b) in spec.backends.iter().enumerate() {
        let filters = compile_filters(&b.filters, &format!("spec.rules[{}].backendRefs[{j}].filters", spec.index))
            .map_err(|(field, reason)| fail(field, reason))?;
        backends.push(Backend {
            service: Arc::from(format!("{}/{}", b.target.namespace, b.target.name)),
            port: Some(b.target.port),
            weight: b.weight,
            filters,
            prefix: prefix.clone(),
        });
    }
    let policy = Policy {
        request_timeout: spec.timeouts.request,
        backend_timeout: spec.timeouts.backend_request,
        retry: spec.retry.as_ref().map(RetryPolicy::from_spec),
    };
    let rule = Rule {
        route: Some(route.clone()),
        index: spec.index,
        filters,
        cumulative: cumulative(&backends),
        backends,
        policy,
        prefix,
    };
    Ok((rule, candidates))
}

fn compile_filters(filters: &[httproute::Filter], at: &str) -> Result<Vec<Filter>, (String, String)> {
    filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let at = format!("{at}[{i}]");
            Ok(match f {
                httproute::Filter::RequestHeaderModifier(m) => {
                    Filter::RequestHeaders(header_modifier(m, &format!("{at}.requestHeaderModifier"))?)
                }
                httproute::Filter::ResponseHeaderModifier(m) => {
                    Filter::ResponseHeaders(header_modifier(m, &format!("{at}.responseHeaderModifier"))?)
                }
                httproute::Filter::RequestRedirect(r) => Filter::Redirect(Redirect {
                    scheme: r.scheme,
                    hostname: r.hostname.as_deref().map(Into::into),
                    path: r.path.clone(),
                    port: r.port,
                    // 301 to 308 by the parse: always a status.
                    status: StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::FOUND),
                }),
                httproute::Filter::UrlRewrite(r) => {
                    let hostname = match &r.hostname {
                        None => None,
                        Some(h) => {
                            let bad = || (format!("{at}.urlRewrite.hostname"), format!("{h:?} is not a hostname"));
                            let authority = Authority::try_from(h.as_str()).map_err(|_| bad())?;
                            let value = HeaderValue::from_str(h).map_err(|_| bad())?;
                            Some((authority, value))
                        }
                    };
                    Filter::Rewrite(Rewrite { hostname, path: r.path.clone() })
                }
                httproute::Filter::RequestMirror(m) => Filter::Mirror(Mirror {
                    service: Arc::from(format!("{}/{}", m.backend.namespace, m.backend.name)),
                    port: m.backend.port,
                    fraction: m.fraction,
                }),
            })
        })
        .collect()
}

fn header_modifier(m: &httproute::HeaderModifier, at: &str) -> Result<HeaderModifier, (String, String)> {
    let name = |n: &str, field: String| {
        HeaderName::from_bytes(n.as_bytes()).map_err(|_| (field, format!("{n:?} is not a header name")))
    };
    let pairs = |list: &[httproute::Header], key: &str| {
        list.iter()
            .enumerate()
            .map(|(i, h)| {
                let value = HeaderValue::from_str(&h.value)
                    .map_err(|_| (format!("{at}.{key}[{i}].value"), format!("{:?} is not a header value", h.value)))?;
                Ok((name(&h.name, format!("{at}.{key}[{i}].name"))?, value))
            })
            .collect::<Result<Vec<_>, (String, String)>>()
    };
    Ok(HeaderModifier {
        set: pairs(&m.set, "set")?,
        add: pairs(&m.add, "add")?,
        remove: m
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| name(n, format!("{at}.remove[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

fn cumulative(backends: &[Backend]) -> Vec<u64> {
    backends
        .iter()
        .scan(0u64, |sum, b| {
            *sum += u64::from(b.weight);
            Some(*sum)
        })
        .collect()
}

/// Everything to the service itself, at the port the request was addressed to.
fn default_rule(service: &Service) -> (Rule, Candidate) {
    let backends = vec![Backend {
        service: Arc::from(format!("{}/{}", service.namespace, service.name)),
        port: None,
        weight: 1,
        filters: Vec::new(),
        prefix: None,
    }];
    let rule = Rule {
        route: None,
        index: 0,
        filters: Vec::new(),
        cumulative: cumulative(&backends),
        backends,
        policy: Policy::default(),
        prefix: None,
    };
    let candidate = Candidate {
        rule: 0,
        path: PathCondition::Prefix("".into()),
        method: None,
        headers: Vec::new(),
        query: Vec::new(),
    };
    (rule, candidate)
}

fn http_method(m: httproute::Method) -> Method {
    match m {
        httproute::Method::Get => Method::GET,
        httproute::Method::Head => Method::HEAD,
        httproute::Method::Post => Method::POST,
        httproute::Method::Put => Method::PUT,
        httproute::Method::Delete => Method::DELETE,
        httproute::Method::Connect => Method::CONNECT,
        httproute::Method::Options => Method::OPTIONS,
        httproute::Method::Trace => Method::TRACE,
        httproute::Method::Patch => Method::PATCH,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn service() -> Service {
        Service {
            name: "api".into(),
            namespace: "shop".into(),
            hostname: "api.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![meshapi::ServicePort { port: 80, target_port: 8080, app_protocol: None }],
            selector: [("app".to_owned(), "api".to_owned())].into(),
            waypoint: Some("shop/wp".into()),
        }
    }

    fn route(key: &str, spec: Value) -> HttpRoute {
        let (namespace, name) = key.split_once('/').unwrap();
        HttpRoute {
            name: name.into(),
            namespace: namespace.into(),
            parents: vec!["shop/api".into()],
            spec,
            fault: None,
        }
    }

    fn table(routes: &[HttpRoute]) -> RouteTable {
        let refs: Vec<&HttpRoute> = routes.iter().collect();
        let (table, problems) = RouteTable::compile(&service(), &refs);
        assert!(problems.is_empty(), "{problems:?}");
        table
    }

    /// A rule that sends `path` matches to the backend named `to`, with `extra` match fields.
    fn rule(to: &str, path: Value, extra: Value) -> Value {
        let mut m = json!({"path": path});
        m.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
        json!({"matches": [m], "backendRefs": [{"name": to, "port": 80}]})
    }

    fn prefix(p: &str) -> Value {
        json!({"type": "PathPrefix", "value": p})
    }

    fn exact(p: &str) -> Value {
        json!({"type": "Exact", "value": p})
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    /// The backend of the rule `method uri` finds, or "404".
    fn send(table: &RouteTable, method: &str, uri: &str, with: &[(&str, &str)]) -> String {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = uri.parse().unwrap();
        match table.find(&method, &uri, &headers(with)) {
            None => "404".into(),
            Some(rule) => rule.backends[0].service.rsplit('/').next().unwrap().to_owned(),
        }
    }

    fn get(table: &RouteTable, uri: &str) -> String {
        send(table, "GET", uri, &[])
    }

    fn parts(method: &str, uri: &str, with: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (n, v) in with {
            builder = builder.header(*n, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn an_exact_path_beats_any_prefix() {
        let t = table(&[route(
            "shop/r",
            json!({"rules": [rule("prefix", prefix("/foo/bar/baz"), json!({})), rule("exact", exact("/foo/bar"), json!({}))]}),
        )]);
        assert_eq!(get(&t, "/foo/bar"), "exact");
        assert_eq!(get(&t, "/foo/bar/"), "404", "exact is the whole path");
        assert_eq!(get(&t, "/foo/bar/baz"), "prefix");
        assert_eq!(get(&t, "/foo/bar?x=1"), "exact", "the query is not the path");
        // An exact match even beats a longer prefix that matches the same path.
        let t = table(&[route(
            "shop/r",
            json!({"rules": [rule("prefix", prefix("/a/b/c/d"), json!({})), rule("exact", exact("/a/b/c/d"), json!({}))]}),
        )]);
        assert_eq!(get(&t, "/a/b/c/d"), "exact");
    }

    #[test]
    fn a_longer_prefix_beats_a_shorter_one() {
        let t = table(&[route(
            "shop/r",
            json!({"rules": [
                rule("root", prefix("/"), json!({})),
                rule("foo", prefix("/foo"), json!({})),
                rule("foobar", prefix("/foo/bar/"), json!({})),
            ]}),
        )]);
        assert_eq!(get(&t, "/foo/bar/x"), "foobar");
        assert_eq!(get(&t, "/foo/bar"), "foobar", "a trailing / of the prefix is ignored");
        assert_eq!(get(&t, "/foo/baz"), "foo");
        assert_eq!(get(&t, "/foo"), "foo");
        assert_eq!(get(&t, "/other"), "root");
    }

    #[test]
    fn a_prefix_matches_whole_segments() {
        let t = table(&[route("shop/r", json!({"rules": [rule("foo", prefix("/foo"), json!({}))]}))]);
        for path in ["/foo", "/foo/", "/foo/bar", "/foo/bar/baz?q=1"] {
            assert_eq!(get(&t, path), "foo", "{path}");
        }
        for path in ["/foobar", "/fo", "/", "/bar/foo"] {
            assert_eq!(get(&t, path), "404", "{path}");
        }
        assert_eq!(get(&t, "http://api.shop/foo/x"), "foo", "an absolute URI (HTTP/2) too");
    }

    #[test]
    fn a_regular_expression_ranks_after_every_prefix_and_matches_the_whole_path() {
        let regex = json!({"type": "RegularExpression", "value": "/api/v[0-9]+(/.*)?"});
        let t = table(&[route(
            "shop/r",
            json!({"rules": [rule("regex", regex, json!({})), rule("api", prefix("/api/v1"), json!({}))]}),
        )]);
        assert_eq!(get(&t, "/api/v1/users"), "api", "the prefix wins though the regex is listed first");
        assert_eq!(get(&t, "/api/v2/users"), "regex");
        assert_eq!(get(&t, "/api/v2"), "regex");
        assert_eq!(get(&t, "/api/v2x"), "404", "the whole path must match");
        assert_eq!(get(&t, "/x/api/v2"), "404", "anchored at the start too");
    }

    #[test]
    fn a_method_match_beats_none_then_headers_then_query_parameters() {
        let t = table(&[route(
            "shop/r",
            json!({"rules": [
                rule("any", prefix("/"), json!({})),
                rule("query", prefix("/"), json!({"queryParams": [{"name": "v", "value": "2"}]})),
                rule("header", prefix("/"), json!({"headers": [{"name": "x-v", "value": "2"}]})),
                rule("two-headers", prefix("/"), json!({"headers": [{"name": "x-v", "value": "2"}, {"name": "x-w", "value": "1"}]})),
                rule("post", prefix("/"), json!({"method": "POST"})),
            ]}),
        )]);
        assert_eq!(send(&t, "GET", "/", &[]), "any");
        assert_eq!(send(&t, "POST", "/?v=2", &[("x-v", "2"), ("x-w", "1")]), "post", "a method beats headers");
        assert_eq!(send(&t, "GET", "/?v=2", &[("x-v", "2"), ("x-w", "1")]), "two-headers", "more headers win");
        assert_eq!(send(&t, "GET", "/?v=2", &[("x-v", "2")]), "header", "a header beats a query parameter");
        assert_eq!(send(&t, "GET", "/?v=2", &[("x-v", "3")]), "query");
        assert_eq!(send(&t, "GET", "/?v=3", &[]), "any");

        // More query parameters win among equals.
        let t = table(&[route(
            "shop/r",
            json!({"rules": [
                rule("one", prefix("/"), json!({"queryParams": [{"name": "a", "value": "1"}]})),
                rule("two", prefix("/"), json!({"queryParams": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]})),
            ]}),
        )]);
        assert_eq!(get(&t, "/?a=1&b=2"), "two");
        assert_eq!(get(&t, "/?a=1"), "one");

        // But a longer prefix beats a method.
        let t = table(&[route(
            "shop/r",
            json!({"rules": [rule("get", prefix("/"), json!({"method": "GET"})), rule("foo", prefix("/foo"), json!({}))]}),
        )]);
        assert_eq!(get(&t, "/foo"), "foo");
        assert_eq!(get(&t, "/"), "get");
    }

    #[test]
    fn ties_go_to_the_route_first_by_namespace_and_name_then_to_the_first_rule() {
        let same = |to: &str| json!({"rules": [rule(to, prefix("/"), json!({}))]});
        let routes = [route("shop/b", same("b")), route("shop/a", same("a")), route("beta/a", same("beta-a"))];
        assert_eq!(get(&table(&routes), "/"), "beta-a", "beta/a < shop/a < shop/b");
        assert_eq!(get(&table(&routes[..2]), "/"), "a");
        let mut reversed = routes[..2].to_vec();
        reversed.reverse();
        assert_eq!(get(&table(&reversed), "/"), "a", "the order routes are given in does not count");

        let t = table(&[route(
            "shop/r",
            json!({"rules": [rule("first", prefix("/x"), json!({})), rule("second", prefix("/x"), json!({}))]}),
        )]);
        assert_eq!(get(&t, "/x"), "first");
    }

    #[test]
    fn header_and_query_matches_read_as_the_gateway_api_says() {
        let t = table(&[route(
            "shop/r",
            json!({"rules": [
                rule("hdr", prefix("/h"), json!({"headers": [
                    {"name": "X-Env", "value": "prod"},
                    {"name": "x-env", "value": "ignored: an equivalent name after the first"},
                    {"type": "RegularExpression", "name": "user-agent", "value": "curl/[0-9.]+"},
                ]})),
                rule("qry", prefix("/q"), json!({"queryParams": [
                    {"name": "name", "value": "a b"},
                    {"type": "RegularExpression", "name": "id", "value": "[0-9]+"},
                ]})),
            ]}),
        )]);
        assert_eq!(send(&t, "GET", "/h", &[("x-env", "prod"), ("user-agent", "curl/8.5.0")]), "hdr");
        assert_eq!(
            send(&t, "GET", "/h", &[("x-env", "dev"), ("x-env", "prod"), ("user-agent", "curl/8")]),
            "hdr",
            "one of several values"
        );
        assert_eq!(send(&t, "GET", "/h", &[("x-env", "Prod"), ("user-agent", "curl/8")]), "404", "values are exact");
        assert_eq!(send(&t, "GET", "/h", &[("x-env", "prod"), ("user-agent", "wget curl/8")]), "404", "whole value");
        assert_eq!(send(&t, "GET", "/h", &[("user-agent", "curl/8")]), "404", "a missing header");
        assert_eq!(get(&t, "/q?name=a%20b&id=42"), "qry", "percent-decoded");
        assert_eq!(get(&t, "/q?id=4%32&name=a%20b"), "qry", "a regex reads the decoded value");
        assert_eq!(get(&t, "/q?name=a%20b&id=42&id=x"), "qry", "the first occurrence");
        assert_eq!(get(&t, "/q?id=x&name=a%20b&id=42"), "404");
        assert_eq!(get(&t, "/q?Name=a%20b&id=42"), "404", "names are exact");
        assert_eq!(get(&t, "/q"), "404");
    }

    #[test]
    fn nothing_matches_means_404_and_no_route_means_the_service_itself() {
        let t = table(&[route("shop/r", json!({"rules": [rule("a", exact("/a"), json!({}))]}))]);
        assert_eq!(get(&t, "/b"), "404");

        let (t, problems) = RouteTable::compile(&service(), &[]);
        assert!(problems.is_empty());
        let rule = t.find(&Method::DELETE, &"/anything?x".parse().unwrap(), &HeaderMap::new()).unwrap();
        assert_eq!(rule.route, None);
        let backend = rule.pick_backend(12345).unwrap();
        assert_eq!(backend.destination(8080), (&Arc::from("shop/api"), 8080), "at the requested port");
        assert_eq!(rule.policy, Policy::default());

        // Routes whose every rule is skipped do not apply: the default, and the problems.
        let bad = route("shop/bad", json!({"rules": [{"filters": [{"type": "Magic"}]}]}));
        let (t, problems) = RouteTable::compile(&service(), &[&bad]);
        assert_eq!(get(&t, "/x"), "api");
        assert_eq!(
            problems[0].to_string(),
            format!("HTTPRoute shop/bad: spec.rules[0].filters[0].type: {}", problems[0].reason)
        );
    }

    #[test]
    fn a_bad_rule_is_skipped_alone_and_named() {
        let r = route(
            "shop/r",
            json!({"rules": [
                rule("good", prefix("/good"), json!({})),
                rule("bad-regex", json!({"type": "RegularExpression", "value": "/(unclosed"}), json!({})),
                rule("bad-header-regex", prefix("/h"), json!({"headers": [{"type": "RegularExpression", "name": "x", "value": "a)|(b"}]})),
                {"matches": [{"path": {"value": "/w"}}], "backendRefs": [{"name": "w", "port": 80, "weight": 2_000_000}]},
            ]}),
        );
        let (t, problems) = RouteTable::compile(&service(), &[&r]);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.rules[3].backendRefs[0].weight",
                "spec.rules[1].matches[0].path.value",
                "spec.rules[2].matches[0].headers[0].value"
            ]
        );
        assert!(problems[1].reason.starts_with("not a regular expression"), "{}", problems[1]);
        assert_eq!(get(&t, "/good"), "good");
        assert_eq!(send(&t, "GET", "/h", &[("x", "a)|(b")]), "404");
        assert_eq!(get(&t, "/w"), "404");
        assert_eq!(t.rules().count(), 1);
    }

    fn weighted(weights: &[u32]) -> Arc<Rule> {
        let backends: Vec<Value> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| json!({"name": format!("b{i}"), "port": 80, "weight": w}))
            .collect();
        let t = table(&[route("shop/r", json!({"rules": [{"backendRefs": backends}]}))]);
        t.rules().next().unwrap().clone()
    }

    /// The middle of the `i`th of `n` equal parts of the `u32` range: evenly spread randomness.
    fn spread(i: u64, n: u64) -> u32 {
        (((2 * i + 1) << 32) / (2 * n)) as u32
    }

    fn picked(rule: &Rule, random: u32) -> Option<&str> {
        rule.pick_backend(random).map(|b| &*b.service)
    }

    #[test]
    fn backends_are_picked_by_weight() {
        let rule = weighted(&[1, 3]);
        assert_eq!(picked(&rule, 0), Some("shop/b0"));
        assert_eq!(picked(&rule, (1 << 30) - 1), Some("shop/b0"), "the first quarter of the range");
        assert_eq!(picked(&rule, 1 << 30), Some("shop/b1"));
        assert_eq!(picked(&rule, u32::MAX), Some("shop/b1"));

        // Evenly spread randomness splits exactly by weight.
        let rule = weighted(&[90, 10, 0]);
        let mut counts = [0u32; 3];
        let n = 10_000u64;
        for i in 0..n {
            let random = spread(i, n);
            let b = rule.pick_backend(random).unwrap();
            counts[b.service.as_bytes()[6] as usize - b'0' as usize] += 1;
        }
        assert_eq!(counts, [9_000, 1_000, 0]);

        // Weight 0 is never chosen, wherever it stands.
        let rule = weighted(&[0, 5, 0]);
        for random in [0, 1, 1 << 31, u32::MAX - 1, u32::MAX] {
            assert_eq!(picked(&rule, random), Some("shop/b1"));
        }
        assert_eq!(picked(&weighted(&[0, 0]), 7), None, "all weights 0: the proxy answers 500");
        assert_eq!(picked(&weighted(&[]), 7), None, "no backend");
        let max = weighted(&[httproute::MAX_WEIGHT; 16]);
        assert_eq!(picked(&max, u32::MAX), Some("shop/b15"), "the largest total does not overflow");
    }

    fn rule_with(spec_rule: Value) -> Arc<Rule> {
        let t = table(&[route("shop/r", json!({"rules": [spec_rule]}))]);
        t.rules().next().unwrap().clone()
    }

    #[test]
    fn header_modifiers_set_add_and_remove() {
        let modifier = json!({"set": [{"name": "X-Set", "value": "new"}], "add": [{"name": "x-add", "value": "b"}], "remove": ["X-Gone"]});
        let rule = rule_with(json!({
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": modifier},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-served-by", "value": "weft"}]}},
            ],
            "backendRefs": [{"name": "v2", "port": 80, "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-backend", "value": "v2"}]}},
            ]}],
        }));
        let mut p = parts(
            "GET",
            "/",
            &[("x-set", "old"), ("x-set", "older"), ("x-add", "a"), ("x-gone", "1"), ("x-keep", "1")],
        );
        rule.apply_request_filters(&mut p).unwrap();
        let values =
            |h: &HeaderMap, n: &str| h.get_all(n).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!(values(&p.headers, "x-set"), ["new"], "set replaces every value");
        assert_eq!(values(&p.headers, "x-add"), ["a", "b"], "add appends");
        assert!(p.headers.get("x-gone").is_none());
        assert_eq!(values(&p.headers, "x-keep"), ["1"]);
        assert!(p.headers.get("x-served-by").is_none(), "a response filter leaves the request alone");
        assert!(p.headers.get("x-backend").is_none(), "the backend's filters are its own");
        rule.backends[0].apply_request_filters(&mut p).unwrap();
        assert_eq!(values(&p.headers, "x-backend"), ["v2"]);

        let mut response = headers(&[("x-served-by", "app")]);
        rule.apply_response_filters(&mut response);
        assert_eq!(values(&response, "x-served-by"), ["weft"]);
        assert!(response.get("x-set").is_none(), "a request filter leaves the response alone");
    }

    fn redirect_rule(redirect: Value, matches: Value) -> Arc<Rule> {
        rule_with(json!({"matches": matches, "filters": [{"type": "RequestRedirect", "requestRedirect": redirect}]}))
    }

    fn location(rule: &Rule, p: &Parts, port: u16) -> (u16, String) {
        let r = rule.redirect(p, port).unwrap().unwrap();
        (r.status.as_u16(), r.location.to_str().unwrap().to_owned())
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let everything = json!([{"path": prefix("/")}]);
        let p = parts("GET", "/a/b?x=1", &[("host", "api.shop:8080")]);

        let rule = redirect_rule(json!({}), everything.clone());
        assert_eq!(location(&rule, &p, 8080), (302, "http://api.shop:8080/a/b?x=1".into()), "the listener's port");
        assert_eq!(location(&rule, &p, 80), (302, "http://api.shop/a/b?x=1".into()), "port 80 left out for http");

        let rule = redirect_rule(json!({"scheme": "https", "statusCode": 301}), everything.clone());
        assert_eq!(location(&rule, &p, 8080), (301, "https://api.shop/a/b?x=1".into()), "the scheme's port, left out");
        let rule = redirect_rule(json!({"scheme": "https", "port": 8443}), everything.clone());
        assert_eq!(location(&rule, &p, 8080).1, "https://api.shop:8443/a/b?x=1");
        let rule = redirect_rule(json!({"scheme": "http", "port": 443}), everything.clone());
        assert_eq!(
            location(&rule, &p, 8080).1,
            "http://api.shop:443/a/b?x=1",
            "only the scheme's own port is left out"
        );
        let rule = redirect_rule(
            json!({"hostname": "new.shop", "path": {"type": "ReplaceFullPath", "replaceFullPath": "/moved"}}),
            everything.clone(),
        );
        assert_eq!(location(&rule, &p, 80).1, "http://new.shop/moved?x=1");
        let rule = redirect_rule(
            json!({"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}, "statusCode": 308}),
            json!([{"path": prefix("/a/")}]),
        );
        assert_eq!(location(&rule, &p, 80), (308, "http://api.shop/v2/b?x=1".into()), "the rule's prefix replaced");

        // HTTP/2: the authority; an IPv6 Host; no host at all.
        let h2 = parts("GET", "http://api.shop:9000/a", &[]);
        let rule = redirect_rule(json!({}), everything.clone());
        assert_eq!(location(&rule, &h2, 9000).1, "http://api.shop:9000/a");
        let v6 = parts("GET", "/a", &[("host", "[fd00::1]:8080")]);
        assert_eq!(location(&rule, &v6, 8080).1, "http://[fd00::1]:8080/a");
        let none = parts("GET", "/a", &[]);
        assert_eq!(rule.redirect(&none, 80), Some(Err(FilterError::NoHost)));
        let none_but_named = redirect_rule(json!({"hostname": "x.shop"}), everything);
        assert_eq!(location(&none_but_named, &none, 80).1, "http://x.shop/a");
        assert!(rule_with(json!({})).redirect(&none, 80).is_none(), "a rule without a redirect");
    }

    #[test]
    fn prefix_replacement_follows_the_gateway_api_table() {
        let table = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/a/b", "/", "/xyz", "/xyz/a/b"),
        ];
        for (path, prefix, replacement, want) in table {
            assert_eq!(
                replace_prefix(path, prefix, replacement).as_deref(),
                Some(want),
                "{path} {prefix} {replacement:?}"
            );
        }
        assert_eq!(replace_prefix("/foobar", "/foo", "/x"), None);
    }

    #[test]
    fn url_rewrites_change_host_and_path_and_keep_the_query() {
        let rule = rule_with(json!({
            "matches": [{"path": prefix("/api")}],
            "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "internal.shop", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}}],
            "backendRefs": [{"name": "api", "port": 80}],
        }));
        let mut p = parts("GET", "/api/users?id=7", &[("host", "api.shop")]);
        rule.apply_request_filters(&mut p).unwrap();
        assert_eq!(p.uri, "/v2/users?id=7");
        assert_eq!(p.headers[HOST], "internal.shop");

        let mut h2 = parts("GET", "http://api.shop:8080/api", &[]);
        rule.apply_request_filters(&mut h2).unwrap();
        assert_eq!(h2.uri, "http://internal.shop/v2", "the authority too, on an absolute URI");

        let full = rule_with(
            json!({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/static"}}}]}),
        );
        let mut p = parts("GET", "/a/b/c?x=1&y", &[("host", "api.shop")]);
        full.apply_request_filters(&mut p).unwrap();
        assert_eq!(p.uri, "/static?x=1&y");
        assert_eq!(p.headers[HOST], "api.shop", "no hostname: the Host is kept");
    }

    #[test]
    fn mirrors_copy_their_share() {
        let rule = rule_with(json!({"filters": [
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "ten", "port": 81}, "percent": 10}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "third", "port": 82}, "fraction": {"numerator": 1, "denominator": 3}}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "all", "port": 83}}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "none", "port": 84}, "percent": 0}},
        ]}));
        let mirrors: Vec<&Mirror> = rule
            .filters
            .iter()
            .filter_map(|f| match f {
                Filter::Mirror(m) => Some(m),
                _ => None,
            })
            .collect();
        let n = 30_000u64;
        let share = |m: &Mirror| (0..n).filter(|i| m.sample(spread(*i, n))).count();
        assert_eq!(share(mirrors[0]), 3_000);
        assert_eq!(share(mirrors[1]), 10_000);
        assert_eq!(share(mirrors[2]), 30_000);
        assert_eq!(share(mirrors[3]), 0);
        assert_eq!(mirrors[1].destination(), (&Arc::from("shop/third"), 82));

        // Random 0 is sampled by every mirror but the 0 %; u32::MAX only by "all".
        let sampled: Vec<&str> = rule.mirrors(|| 0).map(|m| &*m.service).collect();
        assert_eq!(sampled, ["shop/ten", "shop/third", "shop/all"]);
        let sampled: Vec<&str> = rule.mirrors(|| u32::MAX).map(|m| &*m.service).collect();
        assert_eq!(sampled, ["shop/all"]);
    }

    #[test]
    fn timeouts_and_retries_are_plain_policy() {
        let rule = rule_with(json!({
            "timeouts": {"request": "10s", "backendRequest": "0s"},
            "retry": {"codes": [503, 504], "attempts": 3, "backoff": "100ms"},
        }));
        let retry = rule.policy().retry.clone().unwrap();
        assert_eq!(
            *rule.policy(),
            Policy {
                request_timeout: Some(Duration::from_secs(10)),
                backend_timeout: None,
                retry: Some(RetryPolicy {
                    attempts: 3,
                    codes: vec![StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT],
                    backoff: Duration::from_millis(100),
                }),
            }
        );
        assert!(retry.retries_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retry.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
        let waits: Vec<u128> = (1..=6).map(|n| retry.backoff_for(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000], "doubling, capped at 10 times the base");

        let defaults = rule_with(json!({"retry": {}}));
        let retry = defaults.policy().retry.clone().unwrap();
        assert_eq!((retry.attempts, retry.backoff), (DEFAULT_RETRY_ATTEMPTS, DEFAULT_RETRY_BACKOFF));
        assert!(retry.codes.is_empty());
        assert_eq!(rule_with(json!({})).policy().retry, None, "no stanza, no retries");
    }
}
