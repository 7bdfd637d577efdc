#!/bin/sh
# Assemble a root filesystem from this machine's own files, for test images that need
# no registry: rootfs.sh DEST FILE... copies each FILE (directories whole) and every
# shared library the ELF files among them load (as ldd resolves them), plus the
# minimum a process expects: /etc/passwd and /etc/group with root and nonroot (65532,
# as in distroless), /tmp, /var/lib, /home/nonroot.
set -eu
dest=$1
shift
mkdir -p "$dest/etc" "$dest/tmp" "$dest/var/lib" "$dest/home/nonroot" "$dest/usr/local/bin"
chmod 1777 "$dest/tmp"
chown 65532:65532 "$dest/home/nonroot"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$dest/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$dest/etc/group"
copy() {
  mkdir -p "$dest$(dirname "$1")"
  cp -L "$1" "$dest$1"
}
for f in "$@"; do
  if [ -d "$f" ]; then
    mkdir -p "$dest$(dirname "$f")"
    cp -a "$f" "$dest$f"
  else
    copy "$f"
  fi
done
# Libraries of every ELF file copied (executables and Python's extension modules).
find "$dest" -type f \( -perm -u+x -o -name '*.so*' \) | while read -r elf; do
  ldd "$elf" 2>/dev/null | grep -o '/[^ ]*' || true
done | sort -u | while read -r lib; do
  [ -e "$dest$lib" ] || copy "$lib"
done
