#include "ccodecs.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

// libjpeg reports fatal errors through error_exit, which must not return: we longjmp back into the
// function that called libjpeg, which cleans up and returns a status. Warnings (corrupt or truncated
// data, where libjpeg fills in gray and carries on) are counted and the first one is kept.
typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf jump;
    char first_warning[JMSG_LENGTH_MAX];
    int warnings;
} cc_jpeg_error;

static void cc_jpeg_error_exit(j_common_ptr info) {
    cc_jpeg_error *error = (cc_jpeg_error *)info->err;
    longjmp(error->jump, 1);
}

static void cc_jpeg_emit_message(j_common_ptr info, int level) {
    cc_jpeg_error *error = (cc_jpeg_error *)info->err;
    if (level < 0) {
        if (error->warnings == 0) (*info->err->format_message)(info, error->first_warning);
        error->warnings += 1;
    }
}

static void cc_jpeg_output_message(j_common_ptr info) { (void)info; }

static void cc_set_message(char *message, size_t capacity, const char *text) {
    if (message == NULL || capacity == 0) return;
    snprintf(message, capacity, "%s", text);
}

static struct jpeg_error_mgr *cc_jpeg_install_errors(cc_jpeg_error *error) {
    memset(error, 0, sizeof *error);
    struct jpeg_error_mgr *manager = jpeg_std_error(&error->base);
    error->base.error_exit = cc_jpeg_error_exit;
    error->base.emit_message = cc_jpeg_emit_message;
    error->base.output_message = cc_jpeg_output_message;
    return manager;
}

int cc_jpeg_info(const uint8_t *data, size_t length, int *width, int *height, int *components,
                 char *message, size_t message_capacity) {
    struct jpeg_decompress_struct info;
    cc_jpeg_error error;
    info.err = cc_jpeg_install_errors(&error);
    if (setjmp(error.jump)) {
        char text[JMSG_LENGTH_MAX];
        (*info.err->format_message)((j_common_ptr)&info, text);
        cc_set_message(message, message_capacity, text);
        jpeg_destroy_decompress(&info);
        return CC_ERROR;
    }
    jpeg_create_decompress(&info);
    jpeg_mem_src(&info, data, (unsigned long)length);
    jpeg_read_header(&info, TRUE);
    *width = (int)info.image_width;
    *height = (int)info.image_height;
    *components = info.num_components;
    jpeg_destroy_decompress(&info);
    return CC_OK;
}

int cc_jpeg_decode_gray(const uint8_t *data, size_t length, int min_width, int min_height,
                        uint8_t **pixels, int *width, int *height, char *message, size_t message_capacity) {
    struct jpeg_decompress_struct info;
    cc_jpeg_error error;
    uint8_t *volatile buffer = NULL;
    *pixels = NULL;
    info.err = cc_jpeg_install_errors(&error);
    if (setjmp(error.jump)) {
        char text[JMSG_LENGTH_MAX];
        (*info.err->format_message)((j_common_ptr)&info, text);
        cc_set_message(message, message_capacity, text);
        jpeg_destroy_decompress(&info);
        free(buffer);
        return CC_ERROR;
    }
    jpeg_create_decompress(&info);
    jpeg_mem_src(&info, data, (unsigned long)length);
    jpeg_read_header(&info, TRUE);
    info.out_color_space = JCS_GRAYSCALE;
    info.dct_method = JDCT_ISLOW;
    info.scale_num = 1;
    info.scale_denom = 1;
    for (unsigned denom = 8; denom >= 2; denom /= 2) {
        unsigned w = (info.image_width + denom - 1) / denom, h = (info.image_height + denom - 1) / denom;
        if (min_width > 0 && min_height > 0 && w >= (unsigned)min_width && h >= (unsigned)min_height) {
            info.scale_denom = denom;
            break;
        }
    }
    jpeg_start_decompress(&info);
    size_t w = info.output_width, h = info.output_height;
    buffer = malloc(w * h);
    if (buffer == NULL) {
        cc_set_message(message, message_capacity, "out of memory");
        jpeg_destroy_decompress(&info);
        return CC_NOMEM;
    }
    while (info.output_scanline < info.output_height) {
        JSAMPROW row = buffer + (size_t)info.output_scanline * w;
        jpeg_read_scanlines(&info, &row, 1);
    }
    jpeg_finish_decompress(&info);
    jpeg_destroy_decompress(&info);
    *pixels = buffer;
    *width = (int)w;
    *height = (int)h;
    if (error.warnings > 0) {
        cc_set_message(message, message_capacity, error.first_warning);
        return CC_CORRUPT;
    }
    return CC_OK;
}

int cc_jpeg_encode_gray(const uint8_t *pixels, int width, int height, int quality,
                        uint8_t **output, size_t *output_length, char *message, size_t message_capacity) {
    struct jpeg_compress_struct info;
    cc_jpeg_error error;
    unsigned char *volatile buffer = NULL;
    unsigned long size = 0;
    *output = NULL;
    *output_length = 0;
    info.err = cc_jpeg_install_errors(&error);
    if (setjmp(error.jump)) {
        char text[JMSG_LENGTH_MAX];
        (*info.err->format_message)((j_common_ptr)&info, text);
        cc_set_message(message, message_capacity, text);
        jpeg_destroy_compress(&info);
        free(buffer);
        return CC_ERROR;
    }
    jpeg_create_compress(&info);
    unsigned char *destination = NULL;
    jpeg_mem_dest(&info, &destination, &size);
    info.image_width = (JDIMENSION)width;
    info.image_height = (JDIMENSION)height;
    info.input_components = 1;
    info.in_color_space = JCS_GRAYSCALE;
    jpeg_set_defaults(&info);
    jpeg_set_quality(&info, quality, TRUE);
    jpeg_start_compress(&info, TRUE);
    while (info.next_scanline < info.image_height) {
        JSAMPROW row = (JSAMPROW)(pixels + (size_t)info.next_scanline * (size_t)width);
        jpeg_write_scanlines(&info, &row, 1);
    }
    jpeg_finish_compress(&info);
    buffer = destination;
    jpeg_destroy_compress(&info);
    *output = buffer;
    *output_length = size;
    return CC_OK;
}

void cc_free(void *pointer) { free(pointer); }
