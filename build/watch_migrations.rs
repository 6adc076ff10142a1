//! The build script of every crate with a `migrations` folder (each names this file as its
//! `build` in Cargo.toml). `sqlx::migrate!` embeds the migrations when the crate compiles, but
//! on stable Rust it cannot tell cargo to watch their folder: without this a new migration file
//! would not rebuild the crate, and an incremental build would ship the old set. Cargo reads
//! the path relative to the crate that runs the script.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
