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
    let done = sqlx::query(
        "INSERT INTO inbox (group_name, message_id, processed_at) VALUES ($1, $2, $3) ON CONFLICT (group_name, message_id) DO NOTHING",
    )
    .bind(group)
    .bind(message_id)
    .bind(crate::time::to_text(crate::time::now()))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
