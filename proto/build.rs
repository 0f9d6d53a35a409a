//! Generates the agent protocol types from `agent.proto` with prost.

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=agent.proto");
    prost_build::Config::new().compile_protos(&["agent.proto"], &["."])?;
    Ok(())
}
