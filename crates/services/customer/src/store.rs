//! The customer store: decide on the current state, then one transaction appends the events,
//! writes the read model and the outbox.

use domain::DomainError;
use domain::customer::{Customer, CustomerCommand, decide, evolve};
use sqlx::Row;
use storage::Db;
use storage::events::{self, AppendError, NewEvent, is_unique_violation};
use storage::outbox::{self, Handoff, OutboxMessage};
use storage::page::NewestFirst;
use storage::time;
use uuid::Uuid;

const SOURCE: &str = "/orderwave/customer-service";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the customer was changed concurrently")]
    Conflict,
    #[error("the customer is at version {current}")]
    Stale { current: u64 },
    #[error("another customer has this email address")]
    EmailTaken,
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

#[derive(Debug)]
pub struct CustomerStore {
    db: Db,
    handoff: Handoff,
    /// Customers read lately: every order and every notification looks its customer up. A
    /// change made through this store replaces its entry at once; one made by another process
    /// is seen within `CACHE_TTL`.
    cache: moka::sync::Cache<Uuid, Customer>,
}

const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl CustomerStore {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            handoff: Handoff::default(),
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Where the relay takes the outbox rows this store commits.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    /// The customer, as read within the last `CACHE_TTL` (see `cache`).
    pub async fn get(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        if let Some(customer) = self.cache.get(&id) {
            return Ok(Some(customer));
        }
        let customer = self.load(id).await?;
        if let Some(customer) = &customer {
            // Not over a newer version written meanwhile.
            if self
                .cache
                .get(&id)
                .is_none_or(|cached| cached.version < customer.version)
            {
                self.cache.insert(id, customer.clone());
            }
        }
        Ok(customer)
    }

    /// The customer as stored now.
    async fn load(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        let row = sqlx::query("SELECT document FROM customers WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.db.reader())
            .await?;
        row.map(|r| decode(&r.try_get::<String, _>(0)?)).transpose()
    }

    /// Runs a command; `expected` is the version from `If-Match`.
    pub async fn execute(
        &self,
        id: Uuid,
        expected: Option<u64>,
        command: CustomerCommand,
    ) -> Result<Customer, StoreError> {
        let registering = matches!(command, CustomerCommand::Register(_));
        let state = if registering {
            None
        } else {
            self.load(id).await?
        };
        if let (Some(expected), Some(current)) = (expected, &state)
            && current.version != expected
        {
            return Err(StoreError::Stale {
                current: current.version,
            });
        }
        let new_events = decide(state.as_ref(), command)?;
        if new_events.is_empty() {
            return state.ok_or(StoreError::Domain(DomainError::NotFound));
        }
        let at = time::now();
        let at_text = time::to_text(at);
        let mut version = state.as_ref().map_or(0, |c| c.version);
        let mut customer = state;
        let mut stored = Vec::new();
        let mut messages = Vec::new();
        for event in &new_events {
            version += 1;
            customer = evolve(customer, id, version, at, event);
            let v = i64::try_from(version).unwrap_or(i64::MAX);
            stored.push(NewEvent {
                aggregate_id: id.to_string(),
                version: v,
                event_type: event.type_name().to_string(),
                payload: serde_json::to_string(event)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                occurred_at: at_text.clone(),
            });
            messages.push((event.topic(), v));
        }
        let customer =
            customer.ok_or_else(|| StoreError::Corrupt("events built no customer".into()))?;
        let document =
            serde_json::to_string(&customer).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let outbox_rows: Vec<OutboxMessage> = messages
            .into_iter()
            .map(|(topic, v)| {
                OutboxMessage::event(
                    SOURCE,
                    topic,
                    &id.to_string(),
                    v,
                    &at_text,
                    serde_json::json!({ "customerId": id, "version": v, "customer": &customer }),
                )
            })
            .collect();

        let mut tx = self.db.begin_write().await?;
        events::append(&mut tx, &stored)
            .await
            .map_err(|e| match e {
                AppendError::Conflict { .. } => StoreError::Conflict,
                AppendError::Db(e) => StoreError::Db(e),
            })?;
        let version_i64 = i64::try_from(customer.version).unwrap_or(i64::MAX);
        let written = if registering {
            sqlx::query(
                "INSERT INTO customers (id, email, version, created_at, updated_at, document) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id.to_string())
            .bind(&customer.contact.email)
            .bind(version_i64)
            .bind(time::to_text(customer.created_at))
            .bind(&at_text)
            .bind(&document)
            .execute(&mut *tx)
            .await
        } else {
            sqlx::query("UPDATE customers SET email = $1, version = $2, updated_at = $3, document = $4 WHERE id = $5")
                .bind(&customer.contact.email)
                .bind(version_i64)
                .bind(&at_text)
                .bind(&document)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
        };
        match written {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(StoreError::EmailTaken),
            Err(e) => return Err(e.into()),
        }
        let rows = outbox::enqueue(&mut tx, &outbox_rows).await?;
        self.handoff.commit(tx, rows).await?;
        self.cache.insert(id, customer.clone());
        Ok(customer)
    }

    /// Customers newest first, optionally with one email; the page and whether more follow.
    pub async fn list(
        &self,
        email: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<(Vec<Customer>, bool), StoreError> {
        let mut query = NewestFirst::documents_of("customers");
        if let Some(email) = email {
            query.and(" AND email = ?", email.to_ascii_lowercase());
        }
        query.after(after.as_ref());
        let (documents, more) = query.fetch(self.db.reader(), limit).await?;
        let customers = documents
            .iter()
            .map(|d| decode(d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((customers, more))
    }
}

fn decode(text: &str) -> Result<Customer, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}
