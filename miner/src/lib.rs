//! The Veil miner: pulls task references, opens prompts, runs inference, seals results. Arrives with the Miner milestone.
