// `sqlx::migrate!` embeds the migrations when the crate compiles, but on stable Rust it cannot
// tell cargo to watch their folder: without this a new migration file would not rebuild the
// crate, and an incremental build would ship the old set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
