fn main() {
    afl::fuzz!(|data: &[u8]| {
        latchkey::fuzzing::framing(data);
    });
}
