//! Starting the checkout saga: the template the service is configured with, filled in per order and created as a
//! `Saga` resource.

use std::collections::BTreeMap;

use kube::{Api, Client, api::PostParams};
use kubesaga_operator::crd::{InputValue, Saga, SagaSpec};
use uuid::Uuid;

use crate::{OrderError, orders::NewOrder};

/// The template shipped with the service; `--saga-template` replaces it.
pub const DEFAULT_TEMPLATE: &str = include_str!("../checkout-saga.yaml");

/// Where the services the saga calls are, substituted for `${ORDER_URL}`, `${INVENTORY_URL}`, `${PAYMENT_URL}`.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Base URL of the order service.
    pub order: String,
    /// Base URL of the inventory service.
    pub inventory: String,
    /// Base URL of the payment service.
    pub payment: String,
}

/// Parses a template after substituting the endpoints; fails at start-up rather than at the first checkout.
pub fn load_template(text: &str, endpoints: &Endpoints) -> Result<SagaSpec, OrderError> {
    let text = text
        .replace("${ORDER_URL}", endpoints.order.trim_end_matches('/'))
        .replace("${INVENTORY_URL}", endpoints.inventory.trim_end_matches('/'))
        .replace("${PAYMENT_URL}", endpoints.payment.trim_end_matches('/'));
    if let Some(start) = text.find("${") {
        let name: String = text[start..].chars().take_while(|c| *c != '}').collect();
        return Err(OrderError::Template(format!("unknown placeholder {name}}}")));
    }
    serde_yaml::from_str(&text).map_err(|e| OrderError::Template(e.to_string()))
}

/// Creates checkout sagas in one namespace.
#[derive(Clone)]
pub struct SagaStarter {
    api: Api<Saga>,
    namespace: String,
    template: SagaSpec,
}

impl SagaStarter {
    /// Starts sagas in `namespace` from `template`.
    pub fn new(client: Client, namespace: &str, template: SagaSpec) -> Self {
        Self { api: Api::namespaced(client, namespace), namespace: namespace.to_owned(), template }
    }

    /// The `<namespace>/<name>` of the saga for an order (deterministic, so a retried checkout finds it).
    pub fn saga_id(&self, order_id: Uuid) -> String {
        format!("{}/{}", self.namespace, saga_name(order_id))
    }

    /// Creates the saga of `order_id`; an existing one (a retried checkout) counts as created.
    pub async fn start(&self, order_id: Uuid, order: &NewOrder, card_token: &str) -> Result<String, OrderError> {
        let mut spec = self.template.clone();
        spec.input = input(order_id, order, card_token);
        let mut saga = Saga::new(&saga_name(order_id), spec);
        saga.metadata.labels = Some(BTreeMap::from([
            ("app.kubernetes.io/part-of".to_owned(), "kubesaga-checkout".to_owned()),
            ("kubesaga.dev/order-id".to_owned(), order_id.to_string()),
        ]));
        match self
            .api
            .create(&PostParams { field_manager: Some("kubesaga-order".into()), ..Default::default() }, &saga)
            .await
        {
            Ok(_) => Ok(self.saga_id(order_id)),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(self.saga_id(order_id)),
            Err(kube::Error::Api(status)) => Err(OrderError::Saga(format!(
                "the API server refused the saga ({} {}): {}",
                status.code, status.reason, status.message
            ))),
            Err(err) => Err(OrderError::Saga(err.to_string())),
        }
    }
}

fn saga_name(order_id: Uuid) -> String {
    format!("checkout-{order_id}")
}

fn input(order_id: Uuid, order: &NewOrder, card_token: &str) -> BTreeMap<String, InputValue> {
    BTreeMap::from([
        ("orderId".to_owned(), InputValue::String(order_id.to_string())),
        ("customerEmail".to_owned(), InputValue::String(order.customer_email.clone())),
        ("sku".to_owned(), InputValue::String(order.sku.clone())),
        ("quantity".to_owned(), InputValue::Int(i64::from(order.quantity))),
        ("amountCents".to_owned(), InputValue::Int(order.amount_cents)),
        ("currency".to_owned(), InputValue::String(order.currency.clone())),
        ("cardToken".to_owned(), InputValue::String(card_token.to_owned())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> Endpoints {
        Endpoints {
            order: "http://127.0.0.1:1/".into(),
            inventory: "http://inventory.shop.svc:80".into(),
            payment: "http://payment".into(),
        }
    }

    #[test]
    fn the_default_template_loads_and_passes_the_template_checks() {
        let spec = load_template(DEFAULT_TEMPLATE, &endpoints()).expect("template");
        let names: Vec<_> = spec.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["create-order", "reserve-stock", "authorize-payment", "capture-payment", "confirm-stock", "approve-order"]
        );
        assert!(spec.steps[3].pivot);
        assert_eq!(
            spec.steps[1].action.url.as_deref(),
            Some("http://inventory.shop.svc:80/reservations/{{ saga.uid }}")
        );
        let mut filled = spec.clone();
        filled.input = input(
            Uuid::nil(),
            &NewOrder {
                customer_email: "a@b.c".into(),
                sku: "A".into(),
                quantity: 1,
                amount_cents: 100,
                currency: "EUR".into(),
            },
            "tok_ok",
        );
        kubesaga_operator::saga::template::check_spec(&filled).expect("every template reference resolves");
    }

    #[test]
    fn an_unknown_placeholder_is_reported_at_load() {
        let err = load_template("steps: []\n# ${SHIPPING_URL}", &endpoints()).expect_err("unknown placeholder");
        assert!(err.to_string().contains("${SHIPPING_URL}"), "{err}");
    }
}
