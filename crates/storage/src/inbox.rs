//! The inbox: which messages a consumer group has already processed. Claimed in the same
//! transaction as the handler's effects, so a redelivered message has no second effect.

use sqlx::AnyConnection;

/// Claims `message_id` for `group` inside the caller's transaction. `false`: already processed,
/// skip the effects.
pub async fn claim(
    conn: &mut AnyConnection,
    group: &str,
    message_id: &str,
) -> Result<bool, sqlx::Error> {
    claim_all(conn, &[(group, message_id)]).await
}

/// Claims every `(group, message_id)` in one statement. `false` when any was processed already
/// (the caller rolls back and claims them one by one to find which).
pub async fn claim_all(
    conn: &mut AnyConnection,
    claims: &[(&str, &str)],
) -> Result<bool, sqlx::Error> {
    let now = crate::time::to_text(crate::time::now());
    let rows: Vec<Vec<crate::bulk::Value>> = claims
        .iter()
        .map(|(group, message_id)| vec![(*group).into(), (*message_id).into(), now.as_str().into()])
        .collect();
    let inserted = crate::bulk::insert_returning_count(
        conn,
        "INSERT INTO inbox (group_name, message_id, processed_at)",
        "ON CONFLICT (group_name, message_id) DO NOTHING",
        &rows,
    )
    .await?;
    Ok(inserted == claims.len() as u64)
}
