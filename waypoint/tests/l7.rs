//! The waypoint's L7 behaviour end to end in process: a client's HTTP over HBONE to the
//! waypoint, routes, retries, timeouts and the balancer, and HBONE on to the pods' apps, all
//! on loopback (`common` draws the setup). Each test counts what the apps received as well as
//! what the client got, so a request answered by the wrong pod, retried when it should not be,
//! or not retried when it should, shows.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint::proxy::Settings;

fn backend(name: &str, weight: u32) -> serde_json::Value {
    json!({"name": name, "port": SERVICE_PORT, "weight": weight})
}

/// `reviews` split between `reviews-v1` and `reviews-v2` by weight.
fn canary(v1: u32, v2: u32) -> meshapi::HttpRoute {
    route("canary", json!({"rules": [{"backendRefs": [backend("reviews-v1", v1), backend("reviews-v2", v2)]}]}))
}

/// Everything to `service` (one pod), with the rule's `extra` fields.
fn all_to(service: &str, extra: serde_json::Value) -> meshapi::HttpRoute {
    let mut rule = json!({"backendRefs": [backend(service, 1)]});
    if let (Some(rule), serde_json::Value::Object(extra)) = (rule.as_object_mut(), extra) {
        rule.extend(extra);
    }
    route("one", json!({"rules": [rule]}))
}

fn with_header(
    mut req: http::Request<ClientBody>,
    name: &'static str,
    value: &'static str,
) -> http::Request<ClientBody> {
    req.headers_mut().insert(name, HeaderValue::from_static(value));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_weights_split_traffic_and_a_change_moves_it_at_once() {
    let mesh = Mesh::start(Settings::default(), vec![canary(90, 10)]).await;
    let mut h1 = mesh.http1().await;

    // 90/10 over one HTTP/1.1 tunnel: the split is per request, not per connection.
    const N: u64 = 2000;
    let mut on_v1 = 0u64;
    for _ in 0..N {
        let r = send1(&mut h1, get("/reviews/1")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        match r.version.as_deref() {
            Some("v1") => on_v1 += 1,
            Some("v2") => {}
            other => panic!("answered by {other:?}"),
        }
    }
    let share = on_v1 as f64 / N as f64;
    println!("90/10: {:.1}% on v1", share * 100.0);
    assert!((0.87..=0.93).contains(&share), "v1 got {:.1}%", share * 100.0);
    assert_eq!(mesh.counts(), [on_v1, N - on_v1, 0], "each request reached one app once");

    // Requests keep flowing on the same tunnel while the route changes to 0/100.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flow = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && seen.len() < 20_000 && started.elapsed() < Duration::from_secs(30) {
                let at = Instant::now();
                let r = send1(&mut h1, get("/reviews/2")).await;
                seen.push((at, r.status, r.version));
                sent.fetch_add(1, Ordering::Relaxed);
            }
            (h1, seen)
        })
    };
    let until_sent = |n: usize| {
        let sent = sent.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while sent.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    until_sent(100).await;
    mesh.set_routes(vec![canary(0, 100)]);
    let changed = Instant::now();
    until_sent(sent.load(Ordering::Relaxed) + 100).await;
    stop.store(true, Ordering::Relaxed);
    let (mut h1, seen) = flow.await.expect("the client task");
    let before = seen.iter().filter(|(at, ..)| *at < changed).count();
    let after: Vec<_> = seen.iter().filter(|(at, ..)| *at >= changed).collect();
    println!("during the change: {} requests before it, {} after", before, after.len());
    assert!(before >= 100 && after.len() >= 100, "traffic flowed on both sides: {before} / {}", after.len());
    for (_, status, version) in &seen {
        assert_eq!(*status, StatusCode::OK, "no request failed during the change");
        assert!(matches!(version.as_deref(), Some("v1" | "v2")), "{version:?}");
    }
    for (_, _, version) in &after {
        assert_eq!(version.as_deref(), Some("v2"), "every request sent after the change follows it");
    }

    // Two changes in a row with no request between them: the second one is what applies.
    mesh.set_routes(vec![canary(50, 50)]);
    mesh.set_routes(vec![canary(100, 0)]);
    for _ in 0..50 {
        let r = send1(&mut h1, get("/reviews/3")).await;
        assert_eq!((r.status, r.version.as_deref()), (StatusCode::OK, Some("v1")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_exact_beats_prefix_longer_prefix_wins_headers_select_and_no_match_is_404() {
    // Declared in an order unlike their precedence.
    let spec = json!({"rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [backend("reviews-v1", 1)]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/reviews"}}], "backendRefs": [backend("reviews-v3", 1)]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/reviews"},
                      "headers": [{"name": "x-canary", "value": "true"}]}], "backendRefs": [backend("reviews-v2", 1)]},
        {"matches": [{"path": {"type": "Exact", "value": "/api/reviews/top"}}], "backendRefs": [backend("reviews-v2", 1)]},
    ]});
    let mesh = Mesh::start(Settings::default(), vec![route("precedence", spec)]).await;
    let mut h1 = mesh.http1().await;

    let cases: [(&str, Option<&'static str>, &str); 7] = [
        ("/api/reviews/top", None, "v2"),        // Exact beats both prefixes
        ("/api/reviews/top/more", None, "v3"),   // not the exact path: the longer prefix
        ("/api/reviews/7", None, "v3"),          // the longer prefix beats the shorter
        ("/api/reviews", None, "v3"),            // a prefix matches itself
        ("/api/ratings", None, "v1"),            // only the shorter prefix matches
        ("/api/reviews/7", Some("true"), "v2"),  // same prefix, a header match wins
        ("/api/reviews/7", Some("false"), "v3"), // the header must match exactly
    ];
    for (path, canary, want) in cases {
        for _ in 0..10 {
            let mut req = get(path);
            if let Some(v) = canary {
                req.headers_mut().insert("x-canary", HeaderValue::from_static(v));
            }
            let r = send1(&mut h1, req).await;
            assert_eq!((r.status, r.version.as_deref()), (StatusCode::OK, Some(want)), "{path} x-canary={canary:?}");
        }
    }
    // The canary header sends to v2 only.
    let before = mesh.counts();
    for _ in 0..50 {
        let r = send1(&mut h1, with_header(get("/api/reviews/9"), "x-canary", "true")).await;
        assert_eq!(r.version.as_deref(), Some("v2"));
    }
    let after = mesh.counts();
    assert_eq!([after[0] - before[0], after[1] - before[1], after[2] - before[2]], [0, 50, 0]);

    // No rule matches: the waypoint answers 404 itself. `/apix` is not under `/api` (whole
    // segments only).
    for path in ["/", "/other", "/apix", "/ap"] {
        let r = send1(&mut h1, get(path)).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.version, None, "{path}: not an app's answer");
    }
    assert_eq!(mesh.counts(), after, "a 404 reaches no app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_codes_are_retried_on_another_endpoint() {
    let retry = json!({"retry": {"attempts": 3, "codes": [503], "backoff": "1ms"}});
    let mesh = Mesh::start(Settings::default(), vec![all_to_reviews(retry)]).await;
    // One of the three endpoints fails every other request.
    mesh.app("v3").fail_every(2);
    let mut h1 = mesh.http1().await;

    const N: u64 = 400;
    let mut ok = 0;
    for _ in 0..N {
        let r = send1(&mut h1, get("/reviews")).await;
        if r.status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    let failed_by_v3 = mesh.app("v3").requests() / 2;
    println!("with retries: {ok}/{N} succeeded; v3 failed {failed_by_v3}; apps saw {:?}", mesh.counts());
    assert!(ok * 100 >= N * 99, "{ok}/{N} succeeded");
    assert!(failed_by_v3 >= 20, "the failing endpoint was tried: {:?}", mesh.counts());
    // Each 503 cost exactly one more request, to another endpoint.
    assert_eq!(mesh.total(), N + failed_by_v3, "{:?}", mesh.counts());
    assert_eq!(mesh.retries(), failed_by_v3, "each retry counted");

    // Without a retry stanza the client sees every failure, and each request reaches one app.
    mesh.set_routes(vec![all_to_reviews(json!({}))]);
    let (before, v3_before) = (mesh.total(), mesh.app("v3").requests());
    let mut failed = 0;
    for _ in 0..N {
        let r = send1(&mut h1, get("/reviews")).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.version.as_deref(), Some("v3"));
            failed += 1;
        }
    }
    let v3 = mesh.app("v3").requests();
    println!("without retries: {failed}/{N} failed");
    assert!(failed >= 20, "{failed} failures seen");
    assert_eq!(failed, v3 / 2 - v3_before / 2, "every 503 v3 answered reached the client");
    assert_eq!(mesh.total() - before, N, "no request was sent twice");
    // Connections to the endpoints are kept and reused, also after an answer that was retried
    // (its body unread).
    let tunnels: Vec<u64> = mesh.pods.iter().map(|p| p.stats().streams_accepted.load(Ordering::Relaxed)).collect();
    println!("tunnels per pod for {} requests: {tunnels:?}", mesh.total());
    assert!(tunnels.iter().all(|t| *t <= 10), "{tunnels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_codes_and_bodies_over_the_retry_buffer_are_not_retried() {
    const BUFFER: usize = 16 * 1024;
    let settings = Settings { retry_buffer: BUFFER, ..Settings::default() };
    let retry = json!({"retry": {"attempts": 3, "codes": [503], "backoff": "1ms"}});
    let mesh = Mesh::start(settings, vec![all_to("reviews-v1", retry)]).await;
    let app = mesh.app("v1");
    let mut h1 = mesh.http1().await;

    // 500 is not listed: one request each.
    app.answer(500);
    for i in 1..=20 {
        let r = send1(&mut h1, get("/reviews")).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(app.requests(), i, "a 500 is not retried");
    }

    // 503 is: a small body is sent again whole with every attempt.
    app.answer(503);
    let small = 1024;
    let r = send1(&mut h1, request(Method::POST, "/reviews", Full::new(Bytes::from(vec![b'x'; small])).boxed())).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.requests(), 20 + 4, "the first attempt and three retries");
    assert_eq!(app.body_bytes.load(Ordering::Relaxed), 4 * small as u64);

    // A body over the buffer is streamed once, never retried: with a length, and chunked
    // (read past the buffer before the waypoint gives up keeping it).
    let large = 2 * BUFFER;
    let bodies = [Full::new(Bytes::from(vec![b'x'; large])).boxed(), chunked(8, large / 8)];
    for (i, body) in bodies.into_iter().enumerate() {
        let before = (app.requests(), app.body_bytes.load(Ordering::Relaxed));
        let r = send1(&mut h1, request(Method::POST, "/reviews", body)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "body {i}");
        assert_eq!(app.requests(), before.0 + 1, "body {i}: one attempt");
        assert_eq!(app.body_bytes.load(Ordering::Relaxed), before.1 + large as u64, "body {i}: sent whole");
    }
    assert_eq!(app.body_errors.load(Ordering::Relaxed), 0);

    // The same holds over HTTP/2.
    let h2 = mesh.http2().await;
    let before = app.requests();
    let mut req = get2("/reviews");
    *req.method_mut() = Method::POST;
    *req.body_mut() = chunked(8, large / 8);
    assert_eq!(send2(&h2, req).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.requests(), before + 1, "HTTP/2: one attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_refuses_tunnels_is_stepped_over_without_a_retry_policy() {
    // No route: the service itself, no retry stanza.
    let mesh = Mesh::start(Settings::default(), Vec::new()).await;
    mesh.add_unreachable_endpoint();
    let mut h1 = mesh.http1().await;
    for _ in 0..40 {
        let r = send1(&mut h1, get("/reviews")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    println!("an unreachable endpoint: {} retries over 40 requests", mesh.retries());
    assert_eq!(mesh.total(), 40);
    assert!(mesh.retries() >= 1, "the unreachable endpoint was picked and stepped over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_is_answered_504_within_the_request_timeout_or_retried_on_a_fast_one() {
    let mesh =
        Mesh::start(Settings::default(), vec![all_to("reviews-v1", json!({"timeouts": {"request": "400ms"}}))]).await;
    let slow = mesh.app("v1");
    slow.delay(Duration::from_secs(3));
    let mut h1 = mesh.http1().await;

    // The request timeout alone.
    let start = Instant::now();
    let r = send1(&mut h1, get("/reviews")).await;
    let took = start.elapsed();
    println!("request timeout 400ms: 504 after {took:?}");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(took >= Duration::from_millis(390) && took < Duration::from_millis(400 + 250), "{took:?}");

    // Attempts of 150 ms, retried, within a request timeout of 600 ms.
    let policy = json!({"timeouts": {"request": "600ms", "backendRequest": "150ms"},
                        "retry": {"attempts": 10, "codes": [503], "backoff": "10ms"}});
    mesh.set_routes(vec![all_to("reviews-v1", policy)]);
    let before = slow.requests();
    let mut h1 = mesh.http1().await;
    let start = Instant::now();
    let r = send1(&mut h1, get("/reviews")).await;
    let took = start.elapsed();
    let attempts = slow.requests() - before;
    println!("backend timeout 150ms, request timeout 600ms: 504 after {took:?}, {attempts} attempts");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(took >= Duration::from_millis(590) && took < Duration::from_millis(600 + 250), "{took:?}");
    assert!((3..=5).contains(&attempts), "each attempt cut at 150 ms, then retried: {attempts}");

    // One slow endpoint of three: an attempt that times out is retried on a fast one.
    let slow = mesh.app("v3");
    slow.delay(Duration::from_secs(3));
    mesh.app("v1").delay(Duration::ZERO);
    let policy = json!({"timeouts": {"request": "2s", "backendRequest": "200ms"},
                        "retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}});
    mesh.set_routes(vec![all_to_reviews(policy)]);
    let mut h1 = mesh.http1().await;
    let mut retried = 0;
    for _ in 0..30 {
        let start = Instant::now();
        let r = send1(&mut h1, get("/reviews")).await;
        let took = start.elapsed();
        assert_eq!(r.status, StatusCode::OK);
        assert!(matches!(r.version.as_deref(), Some("v1" | "v2")), "{:?}", r.version);
        assert!(took < Duration::from_secs(2), "{took:?}");
        if took >= Duration::from_millis(200) {
            retried += 1;
        }
    }
    println!("one slow endpoint: {retried} of 30 requests retried after 200 ms");
    assert!(slow.requests() >= 1, "the slow endpoint was tried");
    // Those that went to the slow endpoint first were cut after 200 ms and answered by another.
    assert!(retried >= slow.requests(), "{retried} slow answers, {} attempts on the slow endpoint", slow.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_spread_over_every_endpoint_and_grpc_trailers_reach_the_client() {
    // No route: the service itself, three endpoints.
    let mesh = Mesh::start(Settings::default(), Vec::new()).await;
    let h2 = mesh.http2().await;

    const N: usize = 300;
    let mut tasks = tokio::task::JoinSet::new();
    for batch in 0..N / 10 {
        for _ in 0..10 {
            let h2 = h2.clone();
            tasks.spawn(async move { send2(&h2, get2(&format!("/reviews/{batch}"))).await });
        }
        while let Some(r) = tasks.join_next().await {
            assert_eq!(r.expect("a request task").status, StatusCode::OK);
        }
    }
    let counts = mesh.counts();
    println!("HTTP/2 over one tunnel: {counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), N as u64);
    for c in &counts {
        assert!(*c >= (N as u64 / 3) * 7 / 10, "each endpoint gets a fair share: {counts:?}");
    }

    // gRPC: HTTP/2 end to end, the status in trailers.
    for _ in 0..10 {
        let mut req = get2("/reviews.Reviews/Get");
        *req.method_mut() = Method::POST;
        req.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        req.headers_mut().insert("te", HeaderValue::from_static("trailers"));
        *req.body_mut() = Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")).boxed();
        let r = send2(&h2, req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, r.version.as_deref().unwrap_or("none").as_bytes(), "the app's body");
        let trailers = r.trailers.expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(HeaderValue::as_bytes), Some(&b"0"[..]));
        assert_eq!(trailers.get("grpc-message").map(HeaderValue::as_bytes), Some(&b"ok"[..]));
    }
    let metrics = mesh.waypoint.metrics.encode();
    assert!(
        metrics.lines().any(|l| l.contains("request_protocol=\"grpc\"") && l.contains("grpc_response_status=\"0\"")),
        "the trailer's status is recorded:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_retries_stay_within_the_budget() {
    let settings = Settings { retry_budget_ratio: 0.2, retry_budget_min_per_sec: 10.0, ..Settings::default() };
    let (ratio, per_sec) = (settings.retry_budget_ratio, settings.retry_budget_min_per_sec);
    let retry = json!({"retry": {"attempts": 3, "codes": [503], "backoff": "1ms"}});
    let mesh = Mesh::start(settings, vec![all_to_reviews(retry)]).await;
    for app in &mesh.apps {
        app.answer(503);
    }
    let mut h1 = mesh.http1().await;

    const N: u64 = 300;
    let start = Instant::now();
    for _ in 0..N {
        assert_eq!(send1(&mut h1, get("/reviews")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let secs = start.elapsed().as_secs_f64();
    let retries = mesh.total() - N;
    // The budget starts with one second's worth, earns `per_sec` a second and `ratio` a request.
    let bound = (per_sec + ratio * N as f64 + per_sec * secs).ceil() as u64 + 1;
    println!("outage: {N} requests, {retries} retries in {secs:.2}s (budget {bound}; without it {})", 3 * N);
    assert!(retries >= per_sec as u64, "retries were made: {retries}");
    assert!(retries <= bound, "{retries} retries, budget {bound}");
    assert_eq!(mesh.retries(), retries, "each retry counted");
    // A request is refused a retry at most once (then answered); only those that got all
    // three were never refused.
    let refused = mesh.retries_refused();
    assert!(refused >= N - retries / 3 && refused <= N, "refusals counted: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http1_gets_400_and_a_malformed_http2_stream_leaves_the_others_alone() {
    let mesh = Mesh::start(Settings::default(), Vec::new()).await;

    // A header line without a colon and a name with a space.
    for bad in
        [&b"GET / HTTP/1.1\r\nHost: reviews\r\nno colon here\r\n\r\n"[..], b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"]
    {
        let mut tunnel = mesh.tunnel().await;
        tunnel.write_all(bad).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(REQUEST_LIMIT, tunnel.read_to_end(&mut answer))
            .await
            .expect("answered and closed in time")
            .expect("read the answer");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    }
    assert_eq!(mesh.total(), 0);

    // HTTP/2 with the h2 crate: one stream announces 10 bytes and sends 3 (a stream error for
    // its receiver); streams before, beside and after it are answered.
    let (client, conn) = h2::client::handshake(mesh.tunnel().await).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let h2_get = |client: &h2::client::SendRequest<Bytes>| {
        let mut client = client.clone();
        async move {
            let req = http::Request::get(format!("http://{HOST}/reviews")).body(()).expect("request");
            let (response, _) = client.send_request(req, true).expect("send");
            let response = tokio::time::timeout(REQUEST_LIMIT, response).await.expect("in time").expect("response");
            let status = response.status();
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("body");
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            status
        }
    };
    assert_eq!(h2_get(&client).await, StatusCode::OK);
    let bad = {
        let mut client = client.clone();
        let req = http::Request::post(format!("http://{HOST}/reviews"))
            .header(http::header::CONTENT_LENGTH, "10")
            .body(())
            .expect("request");
        let (response, mut body) = client.send_request(req, false).expect("send");
        body.send_data(Bytes::from_static(b"abc"), true).expect("send data");
        tokio::time::timeout(REQUEST_LIMIT, response).await.expect("an answer or a reset in time")
    };
    let side: Vec<StatusCode> = {
        let mut statuses = Vec::new();
        for _ in 0..10 {
            statuses.push(h2_get(&client).await);
        }
        statuses
    };
    match &bad {
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{e}"),
        Ok(r) => assert_eq!(r.status(), StatusCode::BAD_REQUEST),
    }
    assert!(side.iter().all(|s| *s == StatusCode::OK), "{side:?}");
    assert!(!conn.is_finished(), "the connection is still up");
    let after = mesh.total();
    assert!(after >= 11, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_goaway_and_the_request_in_flight_completes() {
    let spec = json!({"rules": [
        {"matches": [{"path": {"value": "/slow"}}], "backendRefs": [backend("reviews-v1", 1)]},
        {"backendRefs": [backend("reviews-v2", 1)]},
    ]});
    let mut mesh = Mesh::start(Settings::default(), vec![route("drain", spec)]).await;
    mesh.app("v1").delay(Duration::from_millis(1500));
    let (client, conn) = h2::client::handshake(mesh.tunnel().await).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let get = |path: &str| http::Request::get(format!("http://{HOST}{path}")).body(()).expect("request");

    let (in_flight, _) = client.clone().send_request(get("/slow"), true).expect("send");
    // The slow request has reached its app before the drain starts.
    let deadline = Instant::now() + REQUEST_LIMIT;
    while mesh.app("v1").requests() == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let drained = tokio::spawn(mesh.drain(Duration::from_secs(8)));

    // New streams are refused once the GOAWAY arrives.
    let goaway = loop {
        assert!(started.elapsed() < Duration::from_secs(3), "no GOAWAY within 3 s of the drain");
        let mut c = client.clone();
        match c.send_request(get("/fast"), true) {
            Err(e) => break e,
            Ok((response, _)) => {
                // Sent before the GOAWAY arrived: answered.
                let r = tokio::time::timeout(REQUEST_LIMIT, response).await.expect("in time");
                if let Err(e) = r {
                    break e;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(goaway.is_go_away() && goaway.is_remote(), "{goaway:?}");
    assert_eq!(goaway.reason(), Some(h2::Reason::NO_ERROR), "a graceful GOAWAY");

    // The request in flight completes whole.
    let response = tokio::time::timeout(REQUEST_LIMIT, in_flight).await.expect("in time").expect("the slow response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.expect("the slow body"));
    }
    assert_eq!(got, b"v1");

    // The connection closes, and the drain ends as soon as it has.
    let closed = tokio::time::timeout(REQUEST_LIMIT, conn).await.expect("the connection ends").expect("task");
    println!("client connection: {closed:?}");
    let outcome = tokio::time::timeout(REQUEST_LIMIT, drained).await.expect("the drain ends").expect("task");
    let took = started.elapsed();
    println!("drain: {outcome:?} after {took:?}");
    assert_eq!(outcome, hbone::drain::Outcome::Graceful);
    assert!(took < Duration::from_secs(4), "the drain waited for the request, not the deadline: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upgrade_joins_the_client_and_the_endpoint() {
    let mesh = Mesh::start(Settings::default(), vec![canary(100, 0)]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(mesh.tunnel().await))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut req = with_header(get("/ws"), "upgrade", "echo");
    req.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = tokio::time::timeout(Duration::from_secs(5), hyper::upgrade::on(response))
        .await
        .expect("upgraded in time")
        .expect("the client's side upgraded");
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    let mut greeting = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut greeting))
        .await
        .expect("in time")
        .expect("greeting");
    assert_eq!(&greeting, b"v1", "the endpoint speaks on the upgraded connection");
    for round in 0..3 {
        let msg = format!("ping {round}");
        io.write_all(msg.as_bytes()).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back)).await.expect("in time").expect("echo");
        assert_eq!(back, msg.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_delay_and_abort_their_share_of_requests() {
    let with_fault = |fault: meshapi::Fault| {
        let mut r = canary(100, 0);
        r.fault = Some(fault);
        r
    };
    // Every request aborted with 503: the apps see nothing.
    let abort = meshapi::Fault { delay: None, abort: Some((503, 100)) };
    let mesh = Mesh::start(Settings::default(), vec![with_fault(abort)]).await;
    let mut h1 = mesh.http1().await;
    for _ in 0..20 {
        assert_eq!(send1(&mut h1, get("/")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(mesh.total(), 0, "an aborted request reached an app");

    // Half of them: about half reach the app.
    mesh.set_routes(vec![with_fault(meshapi::Fault { delay: None, abort: Some((500, 50)) })]);
    let mut aborted = 0;
    for _ in 0..400 {
        if send1(&mut h1, get("/")).await.status == StatusCode::INTERNAL_SERVER_ERROR {
            aborted += 1;
        }
    }
    assert!((140..=260).contains(&aborted), "{aborted} of 400 aborted at 50%");
    assert_eq!(mesh.total(), 400 - aborted as u64);

    // A delay on every request, then forwarded.
    mesh.set_routes(vec![with_fault(meshapi::Fault { delay: Some((Duration::from_millis(200), 100)), abort: None })]);
    for _ in 0..3 {
        let start = Instant::now();
        let reply = send1(&mut h1, get("/")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(start.elapsed() >= Duration::from_millis(200), "not delayed: {:?}", start.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_and_an_oversized_head_refused() {
    let settings =
        Settings { header_timeout: Duration::from_millis(400), max_header_bytes: 16 * 1024, ..Settings::default() };
    let mesh = Mesh::start(settings, vec![canary(100, 0)]).await;
    // Slowloris: a request head sent a byte at a time, never finished.
    let mut slow = mesh.tunnel().await;
    let start = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n").await.expect("write");
    let mut cut = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if slow.write_all(b"x").await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            // Answered (408) or closed: either way the connection is over for this client.
            cut = n == 0 || buf[..n].starts_with(b"HTTP/1.1 408");
            if cut {
                break;
            }
        }
    }
    let held = start.elapsed();
    assert!(cut, "a client that never finished its request head was held for {held:?}");
    assert!(held < Duration::from_millis(1500), "cut after {held:?}, the limit is 400 ms");

    // A head larger than the limit is refused without reaching an app.
    let mut h1 = mesh.http1().await;
    let big = "x".repeat(32 * 1024);
    let mut req = get("/");
    req.headers_mut().insert("x-big", HeaderValue::from_str(&big).unwrap());
    let refused = tokio::time::timeout(Duration::from_secs(5), h1.send_request(req)).await.expect("an answer in time");
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| r.status() == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        "{refused:?}"
    );
    assert_eq!(mesh.total(), 0, "no app saw either request");
    // A request of normal size on a new connection is served.
    let mut h1 = mesh.http1().await;
    assert_eq!(send1(&mut h1, get("/")).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_of_another_protocol_is_forwarded_at_l4() {
    let mesh = Mesh::start(Settings::default(), vec![canary(0, 100)]).await;
    // `reviews-tcp` has the same pods behind a port with appProtocol tcp: the waypoint picks
    // an endpoint and copies bytes; no route applies (the canary sends HTTP to v2 only).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let mut tunnel = mesh.tunnel_to(std::net::SocketAddr::new(mesh.ip(210), SERVICE_PORT)).await;
        tunnel.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut answer)).await.expect("in time").unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        seen.insert(text.rsplit("\r\n").next().unwrap_or("").to_owned());
    }
    assert!(seen.len() > 1, "every connection went to {seen:?}: not balanced, or routed as HTTP");
    let requests = mesh.waypoint.metrics.encode();
    assert!(!requests.contains("istio_requests_total{"), "the waypoint parsed HTTP on an L4 port:\n{requests}");
}
