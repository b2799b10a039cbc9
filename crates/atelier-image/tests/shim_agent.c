/* A stand-in guest agent for the image boot test: runs as PID 1, reports what it sees
 * on the console (marker line), says hello on the virtio-serial control port, sleeps. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

static void read_line(const char *path, char *buf, size_t len) {
    buf[0] = 0;
    FILE *f = fopen(path, "r");
    if (!f) return;
    if (fgets(buf, (int)len, f)) buf[strcspn(buf, "\n")] = 0;
    fclose(f);
}

int main(void) {
    char root[256] = "?", fstype[64] = "?", port[64] = "none", name[128] = "none", line[512];
    int con = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (con < 0) con = 1;
    if (access("/proc/self", F_OK) != 0) mount("proc", "/proc", "proc", 0, NULL);
    if (access("/sys/class", F_OK) != 0) mount("sysfs", "/sys", "sysfs", 0, NULL);
    FILE *m = fopen("/proc/mounts", "r");
    while (m && fgets(line, sizeof line, m)) {
        char dev[256], mnt[256], type[64];
        if (sscanf(line, "%255s %255s %63s", dev, mnt, type) == 3 && strcmp(mnt, "/") == 0) {
            snprintf(root, sizeof root, "%s", dev);
            snprintf(fstype, sizeof fstype, "%s", type);
        }
    }
    if (m) fclose(m);
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char p[300];
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
        read_line(p, name, sizeof name);
        snprintf(port, sizeof port, "/dev/%s", e->d_name);
        break;
    }
    if (d) closedir(d);
    struct stat st;
    int port_ok = stat(port, &st) == 0 && S_ISCHR(st.st_mode);
    int n = snprintf(line, sizeof line,
                     "ATELIER-SHIM-AGENT pid=%d root=%s fstype=%s port=%s port_chardev=%d name=%s\n",
                     (int)getpid(), root, fstype, port, port_ok, name);
    write(con, line, (size_t)n);
    if (port_ok) {
        int fd = open(port, O_RDWR | O_NOCTTY);
        if (fd >= 0) {
            const char hello[] = "hello from the shim agent\n";
            write(fd, hello, sizeof hello - 1);
        }
    }
    for (;;) pause();
}
