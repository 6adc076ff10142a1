//! Templates: one per event type and channel (`order.shipped.email`), rendered with minijinja.
//! Defaults ship for every notifiable event; an operator replaces them through the API, and a
//! template that does not render with the event's sample data is refused when it is saved.

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The channels a notification goes out on.
pub const CHANNELS: [&str; 2] = ["email", "sms"];

/// A template's texts. SMS uses `text_body` only (and no subject line is sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateTexts {
    /// The email subject (kept for SMS, where it is not sent).
    #[schema(example = "Your order {{ order.id }} is on its way")]
    pub subject: String,
    /// The text part (the whole message for SMS).
    #[schema(example = "Hello {{ customer.name }}, {{ order.shipping.carrier }} is bringing it.")]
    pub text_body: String,
    /// The HTML part of an email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html_body: Option<String>,
}

/// A message rendered for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rendered {
    pub subject: String,
    pub text_body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html_body: Option<String>,
}

/// Splits `order.shipped.email` into the event type and the channel.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let (event, channel) = key.rsplit_once('.')?;
    (domain::customer::NOTIFIABLE_EVENTS.contains(&event) && CHANNELS.contains(&channel))
        .then_some((event, channel))
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Printing a missing value is an error (a typo must not send "Hello ,"); testing one in
    // `{% if %}` is allowed, as optional fields need.
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env
}

/// Renders `texts` with `context`; the error says which part failed and why.
pub fn render(texts: &TemplateTexts, context: &Value) -> Result<Rendered, String> {
    let env = environment();
    let one = |name: &str, source: &str| {
        env.render_str(source, context)
            .map_err(|e| format!("{name}: {e}"))
    };
    Ok(Rendered {
        subject: one("subject", &texts.subject)?.trim().to_string(),
        text_body: one("textBody", &texts.text_body)?,
        html_body: texts
            .html_body
            .as_deref()
            .map(|html| {
                // HTML escapes what it prints: a customer's name cannot inject markup.
                let mut env = environment();
                env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
                env.render_str(html, context)
                    .map_err(|e| format!("htmlBody: {e}"))
            })
            .transpose()?,
    })
}

/// What a template of `event` can use, with example values: the preview's default data and
/// what a template is checked against when saved.
pub fn sample(event: &str) -> Value {
    let mut order = json!({
        "id": "019ab1c2-1111-7000-8000-000000000001",
        "customerId": "019ab1c2-0000-7000-8000-000000000001",
        "status": "PENDING",
        "currency": "USD",
        "total": "114.85",
        "items": [
            {"sku": "SKU-CHAIR", "quantity": 2, "unitPrice": "49.90", "lineTotal": "99.80"},
            {"sku": "SKU-LAMP", "quantity": 1, "unitPrice": "15.05", "lineTotal": "15.05"}
        ],
        "shippingAddress": {"name": "Ada Lovelace", "line1": "12 Analytical Row", "city": "London", "postalCode": "N1 7AA", "country": "GB"},
        "version": 1
    });
    let status = match event {
        "order.confirmed" => "CONFIRMED",
        "order.shipped" => "SHIPPED",
        "order.delivered" => "DELIVERED",
        "order.cancelled" => "CANCELLED",
        _ => "PENDING",
    };
    order["status"] = json!(status);
    if matches!(event, "order.shipped" | "order.delivered") {
        order["shipping"] = json!({"carrier": "DHL", "trackingNumber": "JD014600006281234567", "estimatedDelivery": "2026-12-01"});
    }
    if event == "order.cancelled" {
        order["cancelReason"] = json!("out of stock: SKU-DESK (requested 3, available 1)");
    }
    let mut context = json!({
        "customer": {"name": "Ada Lovelace", "email": "ada@example.com"},
        "order": order,
    });
    if event == "payment.refunded" {
        context["refund"] = json!({"amount": "114.85", "currency": "USD", "reason": "order cancelled", "fullyRefunded": true});
    }
    context
}

/// The template shipped for `event` on `channel`.
pub fn default_for(event: &str, channel: &str) -> TemplateTexts {
    let (subject, line) = match event {
        "order.created" => (
            "We received your order {{ order.id }}",
            "we received your order {{ order.id }} ({{ order.total }} {{ order.currency }}). We will let you know once it is confirmed.",
        ),
        "order.confirmed" => (
            "Your order {{ order.id }} is confirmed",
            "your order {{ order.id }} is confirmed: {{ order.total }} {{ order.currency }} was charged.",
        ),
        "order.shipped" => (
            "Your order {{ order.id }} is on its way",
            "your order {{ order.id }} has shipped with {{ order.shipping.carrier }}, tracking number {{ order.shipping.trackingNumber }}.",
        ),
        "order.delivered" => (
            "Your order {{ order.id }} was delivered",
            "your order {{ order.id }} was delivered. Thank you for shopping with us.",
        ),
        "order.cancelled" => (
            "Your order {{ order.id }} was cancelled",
            "your order {{ order.id }} was cancelled{% if order.cancelReason %}: {{ order.cancelReason }}{% endif %}.",
        ),
        _ => (
            "A refund for your order {{ order.id }}",
            "we refunded {{ refund.amount }} {{ refund.currency }} for your order {{ order.id }}.",
        ),
    };
    let text = format!("Hello {{{{ customer.name }}}}, {line}");
    if channel == "sms" {
        return TemplateTexts {
            subject: subject.to_string(),
            text_body: text,
            html_body: None,
        };
    }
    let items = if event == "order.created" || event == "order.confirmed" {
        "\n<ul>{% for item in order.items %}<li>{{ item.quantity }} × {{ item.sku }}: {{ item.lineTotal }} {{ order.currency }}</li>{% endfor %}</ul>"
    } else {
        ""
    };
    TemplateTexts {
        subject: subject.to_string(),
        text_body: format!("{text}\n"),
        html_body: Some(format!(
            "<p>Hello {{{{ customer.name }}}},</p>\n<p>{line}</p>{items}\n"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_default_renders_with_its_sample() {
        for event in domain::customer::NOTIFIABLE_EVENTS {
            for channel in CHANNELS {
                let rendered = render(&default_for(event, channel), &sample(event))
                    .unwrap_or_else(|e| panic!("{event}.{channel}: {e}"));
                assert!(rendered.text_body.starts_with("Hello Ada Lovelace, "));
                assert!(rendered.subject.contains("019ab1c2-1111"), "{rendered:?}");
                assert_eq!(rendered.html_body.is_some(), channel == "email");
            }
        }
        let shipped = render(
            &default_for("order.shipped", "email"),
            &sample("order.shipped"),
        )
        .unwrap();
        assert!(shipped.text_body.contains("DHL"));
        assert!(shipped.text_body.contains("JD014600006281234567"));
    }

    #[test]
    fn printing_a_missing_value_fails_and_html_is_escaped() {
        let typo = TemplateTexts {
            subject: "Order {{ order.idd }}".into(),
            text_body: "x".into(),
            html_body: None,
        };
        let error = render(&typo, &sample("order.created")).unwrap_err();
        assert!(error.starts_with("subject:"), "{error}");
        let mut context = sample("order.created");
        context["customer"]["name"] = json!("<script>x</script>");
        let rendered = render(&default_for("order.created", "email"), &context).unwrap();
        let html = rendered.html_body.unwrap();
        assert!(html.contains("&lt;script&gt;x"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(rendered.text_body.contains("<script>x</script>"));
    }

    #[test]
    fn keys_name_a_notifiable_event_and_a_channel() {
        assert_eq!(
            parse_key("order.shipped.email"),
            Some(("order.shipped", "email"))
        );
        assert_eq!(
            parse_key("payment.refunded.sms"),
            Some(("payment.refunded", "sms"))
        );
        assert_eq!(parse_key("order.shipped.fax"), None);
        assert_eq!(parse_key("order.updated.email"), None);
        assert_eq!(parse_key("email"), None);
    }
}
