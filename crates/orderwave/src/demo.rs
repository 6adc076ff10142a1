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

pub async fn seed(
    inventory: Option<&InventoryService>,
    customers: Option<&CustomerService>,
) -> anyhow::Result<()> {
    if let Some(inventory) = inventory {
        seed_catalogue(inventory).await?;
    }
    if let Some(customers) = customers {
        seed_customer(customers).await?;
    }
    Ok(())
}

async fn seed_catalogue(inventory: &InventoryService) -> anyhow::Result<()> {
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
    tracing::info!("demo catalogue ready: SKU-CHAIR, SKU-DESK, SKU-LAMP");
    Ok(())
}

async fn seed_customer(customers: &CustomerService) -> anyhow::Result<()> {
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
    tracing::info!(customer = %DEMO_CUSTOMER, "demo customer ready");
    Ok(())
}
