fn main() {
    afl::fuzz!(|data: &[u8]| {
        latchkey::fuzzing::h2_frames(data);
    });
}
