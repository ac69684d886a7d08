//! Bad input on every route is answered with a problem naming what is wrong, and changes nothing.

mod common;

use axum::http::{Method, StatusCode};
use common::{Service, new_id, new_key, new_saga, new_sku, raw};
use serde_json::json;

/// One bad request and what it must be answered with.
struct Case {
    what: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: String,
    saga: Option<String>,
    key: bool,
    status: StatusCode,
    problem: &'static str,
    field: Option<&'static str>,
}

fn case(
    what: &'static str,
    method: Method,
    path: &str,
    body: impl Into<String>,
    status: StatusCode,
    field: Option<&'static str>,
) -> Case {
    let problem = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        _ => "validation",
    };
    Case {
        what,
        method,
        path: path.to_owned(),
        content_type: Some("application/json"),
        body: body.into(),
        saga: Some(new_saga()),
        key: true,
        status,
        problem,
        field,
    }
}

#[tokio::test]
async fn every_route_refuses_bad_input_with_a_problem_and_no_state_change() {
    let service = Service::start().await;
    let sku = new_sku();
    service.seed(&sku, 10).await;
    let held = new_id();
    assert_eq!(service.reserve(&held, &new_saga(), &sku, 2).await.status, StatusCode::OK);

    let bad = StatusCode::BAD_REQUEST;
    let reservation = format!("/reservations/{}", new_id());
    let product = format!("/products/{sku}");
    let huge = format!(r#"{{"sku":"{sku}","quantity":1,"pad":"{}"}}"#, "x".repeat(70 * 1024));
    let long_sku = "S".repeat(65);
    let long_id = "r".repeat(129);
    let mut cases = vec![
        // PUT /reservations/{id}
        case("malformed JSON", Method::PUT, &reservation, r#"{"sku": "#, bad, Some("body")),
        case("not an object", Method::PUT, &reservation, "[1, 2]", bad, Some("body")),
        case(
            "quantity of the wrong type",
            Method::PUT,
            &reservation,
            json!({"sku": sku, "quantity": "two"}).to_string(),
            bad,
            Some("quantity"),
        ),
        case(
            "fractional quantity",
            Method::PUT,
            &reservation,
            json!({"sku": sku, "quantity": 1.5}).to_string(),
            bad,
            Some("quantity"),
        ),
        case(
            "sku of the wrong type",
            Method::PUT,
            &reservation,
            json!({"sku": 5, "quantity": 1}).to_string(),
            bad,
            Some("sku"),
        ),
        case("missing quantity", Method::PUT, &reservation, json!({"sku": sku}).to_string(), bad, Some("quantity")),
        case("missing sku", Method::PUT, &reservation, json!({"quantity": 1}).to_string(), bad, Some("sku")),
        case(
            "null quantity",
            Method::PUT,
            &reservation,
            json!({"sku": sku, "quantity": null}).to_string(),
            bad,
            Some("quantity"),
        ),
        case(
            "zero quantity",
            Method::PUT,
            &reservation,
            json!({"sku": sku, "quantity": 0}).to_string(),
            bad,
            Some("quantity"),
        ),
        case(
            "negative quantity",
            Method::PUT,
            &reservation,
            json!({"sku": sku, "quantity": -3}).to_string(),
            bad,
            Some("quantity"),
        ),
        case(
            "enormous quantity",
            Method::PUT,
            &reservation,
            json!({"sku": sku, "quantity": 1_000_000_000_000_i64}).to_string(),
            bad,
            Some("quantity"),
        ),
        case("empty sku", Method::PUT, &reservation, json!({"sku": "", "quantity": 1}).to_string(), bad, Some("sku")),
        case(
            "overlong sku",
            Method::PUT,
            &reservation,
            json!({"sku": long_sku, "quantity": 1}).to_string(),
            bad,
            Some("sku"),
        ),
        case(
            "sku with a space",
            Method::PUT,
            &reservation,
            json!({"sku": "A 1", "quantity": 1}).to_string(),
            bad,
            Some("sku"),
        ),
        case("huge body", Method::PUT, &reservation, huge.clone(), StatusCode::PAYLOAD_TOO_LARGE, None),
        case(
            "overlong id",
            Method::PUT,
            &format!("/reservations/{long_id}"),
            json!({"sku": sku, "quantity": 1}).to_string(),
            bad,
            Some("id"),
        ),
        case(
            "id with a space",
            Method::PUT,
            "/reservations/a%20b",
            json!({"sku": sku, "quantity": 1}).to_string(),
            bad,
            Some("id"),
        ),
        Case {
            saga: None,
            ..case(
                "no X-Saga-Id",
                Method::PUT,
                &reservation,
                json!({"sku": sku, "quantity": 1}).to_string(),
                bad,
                Some("X-Saga-Id"),
            )
        },
        Case {
            saga: Some("two words".into()),
            ..case(
                "bad X-Saga-Id",
                Method::PUT,
                &reservation,
                json!({"sku": sku, "quantity": 1}).to_string(),
                bad,
                Some("X-Saga-Id"),
            )
        },
        Case {
            content_type: None,
            ..case(
                "no content type",
                Method::PUT,
                &reservation,
                json!({"sku": sku, "quantity": 1}).to_string(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
            )
        },
        Case {
            content_type: Some("text/plain"),
            ..case(
                "text body",
                Method::PUT,
                &reservation,
                json!({"sku": sku, "quantity": 1}).to_string(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
            )
        },
        Case {
            key: false,
            problem: "idempotency-key-missing",
            ..case(
                "no Idempotency-Key",
                Method::PUT,
                &reservation,
                json!({"sku": sku, "quantity": 1}).to_string(),
                bad,
                None,
            )
        },
        // PUT /products/{sku}
        case("malformed JSON", Method::PUT, &product, "{", bad, Some("body")),
        case(
            "stock of the wrong type",
            Method::PUT,
            &product,
            json!({"name": "W", "stock": "many"}).to_string(),
            bad,
            Some("stock"),
        ),
        case(
            "name of the wrong type",
            Method::PUT,
            &product,
            json!({"name": 1, "stock": 1}).to_string(),
            bad,
            Some("name"),
        ),
        case("missing stock", Method::PUT, &product, json!({"name": "W"}).to_string(), bad, Some("stock")),
        case("missing name", Method::PUT, &product, json!({"stock": 1}).to_string(), bad, Some("name")),
        case(
            "negative stock",
            Method::PUT,
            &product,
            json!({"name": "W", "stock": -1}).to_string(),
            bad,
            Some("stock"),
        ),
        case(
            "stock beyond 32 bits",
            Method::PUT,
            &product,
            json!({"name": "W", "stock": 3_000_000_000_i64}).to_string(),
            bad,
            Some("stock"),
        ),
        case("blank name", Method::PUT, &product, json!({"name": "  ", "stock": 1}).to_string(), bad, Some("name")),
        case(
            "overlong name",
            Method::PUT,
            &product,
            json!({"name": "n".repeat(201), "stock": 1}).to_string(),
            bad,
            Some("name"),
        ),
        case(
            "overlong sku",
            Method::PUT,
            &format!("/products/{long_sku}"),
            json!({"name": "W", "stock": 1}).to_string(),
            bad,
            Some("sku"),
        ),
        case("huge body", Method::PUT, &product, huge.clone(), StatusCode::PAYLOAD_TOO_LARGE, None),
        Case {
            content_type: None,
            ..case(
                "no content type",
                Method::PUT,
                &product,
                json!({"name": "W", "stock": 1}).to_string(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
            )
        },
        // POST /reservations/{id}/confirm and /cancel
        case("overlong id", Method::POST, &format!("/reservations/{long_id}/confirm"), "", bad, Some("id")),
        case("id with a slash", Method::POST, "/reservations/a%2Fb/confirm", "", bad, Some("id")),
        case(
            "huge body",
            Method::POST,
            &format!("/reservations/{held}/confirm"),
            huge.clone(),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
        case("overlong id", Method::POST, &format!("/reservations/{long_id}/cancel"), "", bad, Some("id")),
        case(
            "huge body",
            Method::POST,
            &format!("/reservations/{held}/cancel"),
            huge.clone(),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
        Case {
            saga: Some("two words".into()),
            ..case("bad X-Saga-Id", Method::POST, &format!("/reservations/{held}/cancel"), "", bad, Some("X-Saga-Id"))
        },
        Case {
            key: false,
            problem: "idempotency-key-missing",
            ..case("no Idempotency-Key", Method::POST, &format!("/reservations/{held}/cancel"), "", bad, None)
        },
        // GET /products/{sku}
        case("overlong sku", Method::GET, &format!("/products/{long_sku}"), "", bad, Some("sku")),
    ];

    let before = service.snapshot().await;
    for case in cases.drain(..) {
        let key = new_key();
        let request = raw(
            case.method.clone(),
            &case.path,
            case.content_type,
            case.body.clone(),
            case.saga.as_deref(),
            case.key.then_some(key.as_str()),
        );
        let answer = service.send(request).await;
        let label =
            format!("{} {} ({}): {answer:?}", case.method, case.path.chars().take(60).collect::<String>(), case.what);
        assert_eq!(answer.status, case.status, "{label}");
        assert_eq!(answer.content_type(), "application/problem+json", "{label}");
        assert_eq!(answer.problem_type(), case.problem, "{label}");
        assert_eq!(answer.body["status"], case.status.as_u16(), "{label}");
        if let Some(field) = case.field {
            assert_eq!(answer.body["field"], field, "{label}");
            assert!(answer.body["detail"].as_str().unwrap_or_default().contains(field), "{label}");
        }
    }
    assert_eq!(service.snapshot().await, before, "refused requests changed nothing");

    let product = service.product(&sku).await;
    assert_eq!((product["stock"].as_i64(), product["reserved"].as_i64()), (Some(10), Some(2)));
    service.stop().await;
}

#[tokio::test]
async fn the_service_documents_itself_and_reports_ready() {
    let service = Service::start().await;
    let answer = service.send(common::get("/openapi.json")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let paths = &answer.body["paths"];
    assert!(paths["/reservations/{id}"]["put"].is_object(), "{}", answer.text);
    assert!(paths["/reservations/{id}/cancel"]["post"].is_object());
    assert!(paths["/products/{sku}"]["get"].is_object() && paths["/products/{sku}"]["put"].is_object());
    let required = &answer.body["components"]["schemas"]["ReserveInput"]["required"];
    assert_eq!(required, &json!(["sku", "quantity"]));
    assert_eq!(service.send(common::get("/readyz")).await.status, StatusCode::OK);
    assert_eq!(service.send(common::get("/healthz")).await.status, StatusCode::OK);
    service.stop().await;
}
