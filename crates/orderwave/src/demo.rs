//! `--demo`: a small catalogue and one customer, so the README walk-through and Swagger UI's
//! examples place an order that really confirms. Seeding is idempotent: what exists is kept.

use anyhow::Context;
use customer_service::CustomerService;
use domain::customer::{CustomerCommand, validate_contact};
use domain::inventory::validate_product;
use inventory_service::InventoryService;
use uuid::Uuid;

/// The demo customer: the id the OpenAPI examples use.
pub const DEMO_CUSTOMER: Uuid = Uuid::from_u128(0x019ab1c2_0000_7000_8000_000000000001);

const PRODUCTS: [(&str, &str, &str, i64); 3] = [
    ("SKU-CHAIR", "Oak chair", "49.90", 100),
    ("SKU-DESK", "Standing desk", "249.00", 20),
    ("SKU-LAMP", "Desk lamp", "19.90", 50),
];

pub async fn seed(inventory: &InventoryService, customers: &CustomerService) -> anyhow::Result<()> {
    for (sku, name, price, on_hand) in PRODUCTS {
        if inventory.store.get(sku).await?.is_some() {
            continue;
        }
        let draft = validate_product(sku, name, price, "USD", on_hand)
            .map_err(|e| anyhow::anyhow!("demo product {sku}: {e:?}"))?;
        match inventory.store.create(&draft).await {
            Ok(_) | Err(inventory_service::store::StoreError::Exists) => {}
            Err(e) => return Err(e).context("creating a demo product"),
        }
    }
    if customers.store.get(DEMO_CUSTOMER).await?.is_none() {
        let contact = validate_contact(
            "Demo Customer",
            "demo@orderwave.example",
            Some("+447700900123"),
            None,
        )
        .map_err(|e| anyhow::anyhow!("demo customer: {e:?}"))?;
        match customers
            .store
            .execute(DEMO_CUSTOMER, None, CustomerCommand::Register(contact))
            .await
        {
            Ok(_) | Err(customer_service::store::StoreError::EmailTaken) => {}
            Err(e) => return Err(e).context("creating the demo customer"),
        }
    }
    tracing::info!(customer = %DEMO_CUSTOMER, "demo catalogue ready: SKU-CHAIR, SKU-DESK, SKU-LAMP");
    Ok(())
}
