//! A payment's life through the API: authorize, capture, void, refund, and what each answers when repeated or
//! out of order.

mod common;

use axum::http::{Method, StatusCode};
use common::{TestApp, new_id, new_key};
use serde_json::{Value, json};

#[tokio::test]
async fn authorize_creates_and_a_repeat_answers_200_with_the_same_payment() {
    let app = TestApp::start().await;
    let id = new_id();
    let created = app.authorize(&id, 4999, "tok_visa").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.header("location"), Some(format!("/payments/{id}").as_str()));
    let body = &created.body;
    assert_eq!((body["paymentId"].as_str(), body["status"].as_str()), (Some(id.as_str()), Some("AUTHORIZED")));
    assert!(body["gatewayRef"].as_str().is_some_and(|r| r.starts_with("gw_")), "{body}");
    assert_eq!((body["amountCents"].as_i64(), body["currency"].as_str()), (Some(4999), Some("EUR")));
    assert!(body.get("cardToken").is_none(), "the card token is not shown");

    let repeated = app.authorize(&id, 4999, "tok_visa").await;
    assert_eq!(repeated.status, StatusCode::OK);
    assert_eq!(repeated.body, created.body);
    assert_eq!(app.get(&format!("/payments/{id}")).await.body, created.body);
    app.finish().await;
}

#[tokio::test]
async fn a_declined_payment_is_422_every_time_and_voiding_it_is_a_no_op() {
    let app = TestApp::start().await;
    let id = new_id();
    let declined = app.authorize(&id, 100, "tok_decline").await;
    let problem = declined.problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
    assert_eq!((problem["reason"].as_str(), problem["paymentId"].as_str()), (Some("card_declined"), Some(id.as_str())));
    let payment = app.get(&format!("/payments/{id}")).await;
    assert_eq!(
        (payment.body["status"].as_str(), payment.body["declineReason"].as_str()),
        (Some("DECLINED"), Some("card_declined"))
    );

    // Retried by the saga under another key (or after the stored answer expired): the same 422, no new charge.
    let again = app.authorize(&id, 100, "tok_decline").await;
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(again.body, declined.body);
    assert_eq!(app.count("SELECT count(*) FROM gateway_ledger").await, 1);

    let void = app.call(Method::POST, &format!("/payments/{id}/void"), None).await;
    assert_eq!(void.status, StatusCode::OK, "{}", void.body);
    assert_eq!(void.body["outcome"], "NOTHING_TO_VOID");
    assert_eq!(void.body["payment"]["status"], "DECLINED");
    assert!(void.body["detail"].as_str().is_some_and(|d| d.contains("declined")), "{}", void.body);
    app.call(Method::POST, &format!("/payments/{id}/capture"), None)
        .await
        .problem(StatusCode::CONFLICT, "invalid-state");
    app.finish().await;
}

#[tokio::test]
async fn void_is_idempotent_and_blocks_capture() {
    let app = TestApp::start().await;
    let id = new_id();
    assert_eq!(app.authorize(&id, 700, "tok_visa").await.status, StatusCode::CREATED);
    let path = format!("/payments/{id}/void");
    let key = new_key();
    let first = app.call_with_key(Method::POST, &path, &key, Some(json!({"reason": "order cancelled"}))).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(
        (first.body["outcome"].as_str(), first.body["payment"]["status"].as_str()),
        (Some("VOIDED"), Some("VOIDED"))
    );
    assert_eq!(first.body["payment"]["version"], 2);

    let replayed = app.call_with_key(Method::POST, &path, &key, Some(json!({"reason": "order cancelled"}))).await;
    assert_eq!((replayed.status, replayed.header("idempotent-replayed")), (StatusCode::OK, Some("true")));
    assert_eq!(replayed.raw, first.raw);
    let second = app.call(Method::POST, &path, None).await;
    assert_eq!((second.status, &second.body), (StatusCode::OK, &first.body), "a second void answers as the first");

    let capture = app.call(Method::POST, &format!("/payments/{id}/capture"), None).await;
    assert_eq!(capture.problem(StatusCode::CONFLICT, "invalid-state")["statusNow"], "VOIDED");
    app.call(Method::POST, &format!("/payments/{id}/refund"), None)
        .await
        .problem(StatusCode::CONFLICT, "invalid-state");
    assert_eq!(app.get(&format!("/payments/{id}")).await.body["version"], 2, "nothing changed after the void");
    app.finish().await;
}

#[tokio::test]
async fn voiding_an_unknown_payment_is_a_no_op_that_refuses_a_late_authorization() {
    let app = TestApp::start().await;
    let id = new_id();
    let void = app.call(Method::POST, &format!("/payments/{id}/void"), None).await;
    assert_eq!(void.status, StatusCode::OK, "{}", void.body);
    assert_eq!((void.body["outcome"].as_str(), &void.body["payment"]), (Some("NOTHING_TO_VOID"), &Value::Null));
    let again = app.call(Method::POST, &format!("/payments/{id}/void"), None).await;
    assert_eq!(again.body, void.body);

    // The authorization the saga gave up on arrives late: refused, so no funds stay held.
    let late = app.authorize(&id, 100, "tok_visa").await;
    late.problem(StatusCode::CONFLICT, "invalid-state");
    assert_eq!(app.get(&format!("/payments/{id}")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.count("SELECT count(*) FROM gateway_ledger").await, 0, "refused before the gateway was called");
    app.finish().await;
}

#[tokio::test]
async fn capture_then_refund_and_what_is_refused_in_between() {
    let app = TestApp::start().await;
    let id = new_id();
    assert_eq!(app.authorize(&id, 1200, "tok_visa").await.status, StatusCode::CREATED);
    let refund_path = format!("/payments/{id}/refund");
    let early_refund = app.call(Method::POST, &refund_path, None).await;
    assert_eq!(early_refund.problem(StatusCode::CONFLICT, "invalid-state")["statusNow"], "AUTHORIZED");

    let capture_path = format!("/payments/{id}/capture");
    let partial = app.call(Method::POST, &capture_path, Some(json!({"amountCents": 1000}))).await;
    assert_eq!(partial.problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable")["field"], "amountCents");
    let captured = app.call(Method::POST, &capture_path, Some(json!({"amountCents": 1200}))).await;
    assert_eq!(
        (captured.status, captured.body["status"].as_str()),
        (StatusCode::OK, Some("CAPTURED")),
        "{}",
        captured.body
    );
    let recaptured = app.call(Method::POST, &capture_path, None).await;
    assert_eq!((recaptured.status, &recaptured.body), (StatusCode::OK, &captured.body));

    app.call(Method::POST, &format!("/payments/{id}/void"), None).await.problem(StatusCode::CONFLICT, "invalid-state");

    let refunded = app.call(Method::POST, &refund_path, Some(json!({"reason": "customer returned it"}))).await;
    assert_eq!(
        (refunded.status, refunded.body["status"].as_str()),
        (StatusCode::OK, Some("REFUNDED")),
        "{}",
        refunded.body
    );
    let again = app.call(Method::POST, &refund_path, None).await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &refunded.body));
    // The pivot stays retryable: capturing a payment captured (and since refunded) succeeds without a new charge.
    let late_capture = app.call(Method::POST, &capture_path, None).await;
    assert_eq!((late_capture.status, late_capture.body["status"].as_str()), (StatusCode::OK, Some("REFUNDED")));

    let reference = captured.body["gatewayRef"].as_str().expect("gatewayRef");
    let operations: Vec<_> =
        app.gateway.entries(reference).await.expect("ledger").into_iter().map(|entry| entry.operation).collect();
    assert_eq!(operations, ["authorize", "capture", "refund"]);
    app.finish().await;
}

#[tokio::test]
async fn unknown_payments_are_404_for_get_capture_and_refund() {
    let app = TestApp::start().await;
    let id = new_id();
    app.get(&format!("/payments/{id}")).await.problem(StatusCode::NOT_FOUND, "not-found");
    for action in ["capture", "refund"] {
        app.call(Method::POST, &format!("/payments/{id}/{action}"), None)
            .await
            .problem(StatusCode::NOT_FOUND, "not-found");
    }
    app.get("/no/such/route").await.problem(StatusCode::NOT_FOUND, "not-found");
    app.finish().await;
}

#[tokio::test]
async fn operational_routes_and_the_openapi_document_are_served() {
    let app = TestApp::start().await;
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
    let openapi = app.get("/openapi.json").await;
    assert_eq!(openapi.status, StatusCode::OK);
    let paths = &openapi.body["paths"];
    for (path, method) in [
        ("/payments/{id}", "put"),
        ("/payments/{id}", "get"),
        ("/payments/{id}/capture", "post"),
        ("/payments/{id}/void", "post"),
        ("/payments/{id}/refund", "post"),
    ] {
        assert!(paths[path][method].is_object(), "{path} {method} missing from {paths}");
    }
    assert!(openapi.body["components"]["schemas"]["Payment"].is_object());
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_capture_racing_a_void_cannot_both_succeed() {
    let app = TestApp::with(common::Settings {
        gateway: kubesaga_payment::gateway::GatewayConfig {
            latency: std::time::Duration::from_millis(30),
            ..kubesaga_payment::gateway::GatewayConfig::instant()
        },
        ..common::settings()
    })
    .await;
    for _ in 0..5 {
        let id = new_id();
        assert_eq!(app.authorize(&id, 900, "tok_visa").await.status, StatusCode::CREATED);
        let race = |action: &'static str| {
            let (router, path) = (app.router.clone(), format!("/payments/{id}/{action}"));
            tokio::spawn(async move {
                common::send(&router, common::json_request(Method::POST, &path, &new_key(), None)).await
            })
        };
        let (capture, void) = (race("capture"), race("void"));
        let (capture, void) = (capture.await.expect("capture task"), void.await.expect("void task"));
        let winners = [capture.status, void.status].iter().filter(|status| **status == StatusCode::OK).count();
        assert_eq!(winners, 1, "capture {} {} / void {} {}", capture.status, capture.body, void.status, void.body);

        let payment = app.get(&format!("/payments/{id}")).await.body;
        let reference = payment["gatewayRef"].as_str().expect("gatewayRef");
        let approved: Vec<_> = app
            .gateway
            .entries(reference)
            .await
            .expect("ledger")
            .into_iter()
            .filter(|entry| entry.approved && entry.operation != "authorize")
            .map(|entry| entry.operation)
            .collect();
        let expected = if capture.status == StatusCode::OK { ("CAPTURED", "capture") } else { ("VOIDED", "void") };
        assert_eq!(payment["status"], expected.0);
        assert_eq!(approved, [expected.1], "the gateway agrees with the database");
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authorization_overtaken_by_its_void_is_released_at_the_gateway() {
    let app = TestApp::with(common::Settings {
        gateway: kubesaga_payment::gateway::GatewayConfig {
            latency: std::time::Duration::from_millis(300),
            ..kubesaga_payment::gateway::GatewayConfig::instant()
        },
        ..common::settings()
    })
    .await;
    let id = new_id();
    let authorize = {
        let (router, path) = (app.router.clone(), format!("/payments/{id}"));
        tokio::spawn(async move {
            let body = common::authorize_body(100, "tok_visa");
            common::send(&router, common::json_request(Method::PUT, &path, &new_key(), Some(body))).await
        })
    };
    // The saga gave up on the authorization and compensates while the gateway is still answering it.
    common::sleep(std::time::Duration::from_millis(100)).await;
    let void = app.call(Method::POST, &format!("/payments/{id}/void"), None).await;
    assert_eq!(
        (void.status, void.body["outcome"].as_str()),
        (StatusCode::OK, Some("NOTHING_TO_VOID")),
        "{}",
        void.body
    );

    let late = authorize.await.expect("authorize task");
    late.problem(StatusCode::CONFLICT, "invalid-state");
    assert_eq!(app.get(&format!("/payments/{id}")).await.status, StatusCode::NOT_FOUND);
    let authorization = app
        .gateway
        .entry(&kubesaga_payment::gateway::FakeGateway::key(&id, kubesaga_payment::gateway::Operation::Authorize))
        .await
        .expect("ledger")
        .expect("the gateway authorized");
    let operations: Vec<_> = app
        .gateway
        .entries(&authorization.reference)
        .await
        .expect("ledger")
        .into_iter()
        .map(|entry| (entry.operation, entry.approved))
        .collect();
    assert_eq!(operations, [("authorize".to_owned(), true), ("void".to_owned(), true)], "the hold was released");
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
    app.finish().await;
}
