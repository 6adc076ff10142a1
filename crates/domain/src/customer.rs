//! The customer aggregate: contact data and notification preferences.

use crate::error::{DomainError, FieldError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The event types a customer can ask to be notified of.
pub const NOTIFIABLE_EVENTS: [&str; 6] = [
    "order.created",
    "order.confirmed",
    "order.shipped",
    "order.delivered",
    "order.cancelled",
    "payment.refunded",
];

/// Which events reach the customer on which channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationPreferences {
    pub email: Vec<String>,
    pub sms: Vec<String>,
}

impl Default for NotificationPreferences {
    /// Every order event by email, nothing by SMS until the customer opts in.
    fn default() -> Self {
        Self {
            email: NOTIFIABLE_EVENTS.iter().map(|e| e.to_string()).collect(),
            sms: Vec::new(),
        }
    }
}

/// Validated contact data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
    pub preferences: NotificationPreferences,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    pub id: Uuid,
    #[serde(flatten)]
    pub contact: Contact,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerCommand {
    Register(Contact),
    Update(Contact),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum CustomerEvent {
    CustomerRegistered(Contact),
    CustomerUpdated(Contact),
}

impl CustomerEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            CustomerEvent::CustomerRegistered(_) => "CustomerRegistered",
            CustomerEvent::CustomerUpdated(_) => "CustomerUpdated",
        }
    }

    pub fn topic(&self) -> &'static str {
        match self {
            CustomerEvent::CustomerRegistered(_) => "customer.created",
            CustomerEvent::CustomerUpdated(_) => "customer.updated",
        }
    }
}

/// Decides the events of a command. Pure.
pub fn decide(
    state: Option<&Customer>,
    command: CustomerCommand,
) -> Result<Vec<CustomerEvent>, DomainError> {
    match (state, command) {
        (None, CustomerCommand::Register(contact)) => {
            Ok(vec![CustomerEvent::CustomerRegistered(contact)])
        }
        (Some(_), CustomerCommand::Register(_)) => Err(DomainError::AlreadyExists),
        (None, CustomerCommand::Update(_)) => Err(DomainError::NotFound),
        (Some(current), CustomerCommand::Update(contact)) => {
            if current.contact == contact {
                Ok(Vec::new())
            } else {
                Ok(vec![CustomerEvent::CustomerUpdated(contact)])
            }
        }
    }
}

/// Applies one event at `version` and time `at`. Pure.
pub fn evolve(
    state: Option<Customer>,
    id: Uuid,
    version: u64,
    at: DateTime<Utc>,
    event: &CustomerEvent,
) -> Option<Customer> {
    match (state, event) {
        (None, CustomerEvent::CustomerRegistered(contact)) => Some(Customer {
            id,
            contact: contact.clone(),
            version,
            created_at: at,
            updated_at: at,
        }),
        (Some(mut customer), CustomerEvent::CustomerUpdated(contact)) => {
            customer.contact = contact.clone();
            customer.version = version;
            customer.updated_at = at;
            Some(customer)
        }
        (state, _) => state,
    }
}

/// An email address as a shop can use it: one `@`, a dotted domain, no spaces, ≤ 254 bytes.
pub fn is_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    text.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && text.chars().all(|c| c.is_ascii_graphic())
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// E.164: `+`, a non-zero digit, at most 15 digits in all.
pub fn is_e164(text: &str) -> bool {
    let Some(digits) = text.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Validates contact data as a client sent it.
pub fn validate_contact(
    name: &str,
    email: &str,
    phone: Option<&str>,
    preferences: Option<(&[String], &[String])>,
) -> Result<Contact, Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = crate::text::required(&mut errors, "name", name, 200);
    let email = email.to_ascii_lowercase();
    if !is_email(&email) {
        errors.push(FieldError::new(
            "email",
            "must be an email address such as ada@example.com",
        ));
    }

    if let Some(p) = phone
        && !is_e164(p)
    {
        errors.push(FieldError::new(
            "phone",
            "must be an E.164 number such as +14155550123",
        ));
    }
    let preferences = match preferences {
        None => NotificationPreferences::default(),
        Some((email_events, sms_events)) => {
            for (channel, events) in [("email", email_events), ("sms", sms_events)] {
                for (i, event) in events.iter().enumerate() {
                    if !NOTIFIABLE_EVENTS.contains(&event.as_str()) {
                        errors.push(FieldError::new(
                            format!("notificationPreferences.{channel}[{i}]"),
                            format!("must be one of {}", NOTIFIABLE_EVENTS.join(", ")),
                        ));
                    }
                }
            }
            if !sms_events.is_empty() && phone.is_none() {
                errors.push(FieldError::new(
                    "notificationPreferences.sms",
                    "needs a phone number",
                ));
            }
            let dedup = |events: &[String]| {
                let mut v: Vec<String> = events.to_vec();
                v.sort();
                v.dedup();
                v
            };
            NotificationPreferences {
                email: dedup(email_events),
                sms: dedup(sms_events),
            }
        }
    };
    if errors.is_empty() {
        Ok(Contact {
            name,
            email,
            phone: phone.map(str::to_string),
            preferences,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_phone_numbers_are_checked() {
        assert!(is_email("ada@example.com"));
        assert!(is_email("a.b+shop@mail.example.co.uk"));
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@.example.com",
            "ada@example..com",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
        assert!(is_e164("+14155550123"));
        assert!(is_e164("+447911123456"));
        for bad in [
            "14155550123",
            "+0123",
            "+1",
            "+1415555012345678",
            "+1 415 555",
            "+1-415",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }

    #[test]
    fn sms_preferences_need_a_phone_and_known_events() {
        let sms = vec!["order.shipped".to_string()];
        let none: Vec<String> = Vec::new();
        assert!(validate_contact("Ada", "ada@example.com", None, Some((&none, &sms))).is_err());
        assert!(
            validate_contact(
                "Ada",
                "ada@example.com",
                Some("+14155550123"),
                Some((&none, &sms))
            )
            .is_ok()
        );
        let unknown = vec!["order.teleported".to_string()];
        let errors = validate_contact("Ada", "ada@example.com", None, Some((&unknown, &none)))
            .err()
            .unwrap_or_default();
        assert_eq!(errors[0].field, "notificationPreferences.email[0]");
    }

    #[test]
    fn an_update_that_changes_nothing_records_nothing() {
        let contact = validate_contact("Ada", "ADA@example.com", None, None)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(contact.email, "ada@example.com");
        let at = Utc::now();
        let customer = evolve(
            None,
            Uuid::now_v7(),
            1,
            at,
            &CustomerEvent::CustomerRegistered(contact.clone()),
        );
        assert_eq!(
            decide(customer.as_ref(), CustomerCommand::Update(contact)),
            Ok(vec![])
        );
        assert!(matches!(
            decide(
                None,
                CustomerCommand::Update(
                    validate_contact("B", "b@example.com", None, None)
                        .unwrap_or_else(|e| panic!("{e:?}"))
                )
            ),
            Err(DomainError::NotFound)
        ));
    }
}
