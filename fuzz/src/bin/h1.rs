fn main() {
    afl::fuzz!(|data: &[u8]| {
        latchkey::fuzzing::h1(data);
    });
}
