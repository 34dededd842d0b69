/* A TFLite external delegate for tests: the C ABI of tflite_plugin_create_delegate (as the
 * i.MX boards' libvx_delegate.so, libethosu_delegate.so and libneutron_delegate.so export it),
 * with a Prepare that either takes no nodes (EDGEPACK_TEST_DELEGATE=accept: the graph stays
 * on the CPU kernels) or refuses the graph (=refuse, the default), and a create that fails
 * outright (=null). Each call of Prepare is appended to $EDGEPACK_TEST_DELEGATE_LOG. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct TfLiteDelegate TfLiteDelegate;
struct TfLiteDelegate {
    void *data_;
    int (*Prepare)(void *context, TfLiteDelegate *delegate);
    int (*CopyFromBufferHandle)(void *context, TfLiteDelegate *delegate, int handle, void *tensor);
    int (*CopyToBufferHandle)(void *context, TfLiteDelegate *delegate, int handle, void *tensor);
    void (*FreeBufferHandle)(void *context, TfLiteDelegate *delegate, int *handle);
    int64_t flags;
    void *opaque_delegate_builder;
};

static const char *mode(void) {
    const char *m = getenv("EDGEPACK_TEST_DELEGATE");
    return m ? m : "refuse";
}

static void log_call(const char *what) {
    const char *path = getenv("EDGEPACK_TEST_DELEGATE_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s\n", what);
    fclose(f);
}

static int prepare(void *context, TfLiteDelegate *delegate) {
    (void)context;
    (void)delegate;
    log_call("prepare");
    /* kTfLiteOk = 0, kTfLiteError = 1 */
    return strcmp(mode(), "accept") == 0 ? 0 : 1;
}

TfLiteDelegate *tflite_plugin_create_delegate(char **keys, char **values, size_t n,
                                              void (*report_error)(const char *)) {
    (void)keys;
    (void)values;
    (void)n;
    log_call("create");
    if (strcmp(mode(), "null") == 0) {
        if (report_error) report_error("test delegate: no NPU here");
        return NULL;
    }
    TfLiteDelegate *d = calloc(1, sizeof *d);
    if (d) d->Prepare = prepare;
    return d;
}

void tflite_plugin_destroy_delegate(TfLiteDelegate *delegate) {
    log_call("destroy");
    free(delegate);
}
